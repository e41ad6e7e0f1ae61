"""ImageNet16-120 from downsampled-ImageNet files (never unpickled as such) and the NAS-Bench-201 lookup, on small
files the tests write in the published layouts."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from pcdarts_core import data as data_lib
from pcdarts_core.config import search_config
from pcdarts_core.imagenet16 import read_batch
from pcdarts_core.nb201_arch import parse_arch, random_arch
from pcdarts_core.nb201_bench import benchmark_from_dict, load_benchmark
from pcdarts_core.search import Searcher

torch.set_num_threads(1)


# -- ImageNet16-120 -----------------------------------------------------------------------------------------------
def _batch(labels: list[int], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(len(labels), 768), dtype=np.uint8)
    return {"data": data, "labels": labels, "mean": data.mean(axis=0)}


def write_imagenet16(root, npz_for: tuple[str, ...] = ()) -> dict[str, dict]:
    """Two training batches and val_data in the published pickle format (labels 1..1000; 1..120 are kept)."""
    os.makedirs(root, exist_ok=True)
    files = {"train_data_batch_1": _batch([1, 120, 121, 5, 999, 7], 1), "train_data_batch_2": _batch([2, 3, 500], 2),
             "val_data": _batch([120, 1, 1000, 60], 3)}
    for name, entry in files.items():
        if name in npz_for:
            np.savez(os.path.join(root, name + ".npz"), data=entry["data"], labels=np.array(entry["labels"]))
        else:
            with open(os.path.join(root, name), "wb") as fh:
                pickle.dump(entry, fh, protocol=2)
    return files


def test_imagenet16_120_keeps_labels_1_to_120_and_reads_pixels_channel_major(tmp_path):
    files = write_imagenet16(tmp_path, npz_for=("train_data_batch_2",))
    ev = data_lib.eval_data("imagenet16-120", str(tmp_path))
    assert ev.num_classes == 120 and ev.image_size == 16
    assert ev.train_set.targets == [0, 119, 4, 6, 1, 2] and ev.test_set.targets == [119, 0, 59]
    raw = files["val_data"]["data"][0].reshape(3, 16, 16)  # R, G and B planes
    assert np.array_equal(ev.test_set.images[0], raw.transpose(1, 2, 0))
    x, y = ev.test_set[0]
    assert x.shape == (3, 16, 16) and y == 119
    info = data_lib.DATASETS["imagenet16-120"]
    expected = (torch.tensor(raw[0, 0, 0] / 255.0) - info.mean[0]) / info.std[0]
    assert float(x[0, 0, 0]) == pytest.approx(float(expected), abs=1e-5)
    sd = data_lib.search_data("imagenet16-120", str(tmp_path), train_portion=0.5)
    assert len(sd.weight_set) == 3 and len(sd.arch_set) == 3 and sd.num_classes == 120


def test_imagenet16_search_runs_in_nb201(tmp_path):
    write_imagenet16(tmp_path)
    cfg = search_config("darts", "imagenet16-120", search_space="nb201", data_dir=str(tmp_path), init_channels=4,
                        layers=1, batch_size=2, epochs=1, steps_per_epoch=1, eval_steps=1, device="cpu")
    searcher = Searcher(cfg)
    assert searcher.num_classes == 120 and searcher.net.classifier.out_features == 120
    assert parse_arch(searcher.run_epoch()["genotype"].split('"')[3])


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch BOOM_MARKER",))


def test_pickles_with_code_are_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_imagenet16(tmp_path)
    with open(tmp_path / "train_data_batch_1", "wb") as fh:
        pickle.dump({"data": _Boom(), "labels": [1]}, fh)
    with pytest.raises(ValueError, match="refusing to load posix.system|refusing to load os.system") as err:
        read_batch(str(tmp_path / "train_data_batch_1"))
    assert "\n" not in str(err.value) and not (tmp_path / "BOOM_MARKER").exists()
    with open(tmp_path / "train_data_batch_2", "wb") as fh:
        pickle.dump({"data": np.array([object()] * 768, dtype=object).reshape(1, 768), "labels": [1]}, fh)
    with pytest.raises(ValueError):
        read_batch(str(tmp_path / "train_data_batch_2"))
    (tmp_path / "val_data").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a downsampled-ImageNet batch"):
        read_batch(str(tmp_path / "val_data"))


def test_missing_imagenet16_files_are_one_line_errors(tmp_path):
    with pytest.raises(data_lib.DatasetError, match="train_data_batch_1.*Imagenet16_train.zip"):
        data_lib.check_dataset("imagenet16-120", str(tmp_path))
    write_imagenet16(tmp_path)
    os.remove(tmp_path / "val_data")
    with pytest.raises(data_lib.DatasetError, match="val_data"):
        data_lib.check_dataset("imagenet16-120", str(tmp_path))


# -- the NAS-Bench-201 lookup --------------------------------------------------------------------------------
def _results(acc_by_dataset: dict[str, list[float]]) -> dict:
    """An ArchResults state dict as the benchmark stores it: (dataset, seed) -> ResultsCount state dict."""
    all_results = {}
    for dataset, accs in acc_by_dataset.items():
        test_set = "ori-test" if dataset == "cifar10" else "x-test"
        for seed, acc in zip((777, 888, 999), accs):
            all_results[(dataset, seed)] = {"name": dataset, "epochs": 200, "params": 1.0,
                                            "eval_acc1es": {f"{test_set}@199": acc, f"{test_set}@198": 0.0,
                                                            "x-valid@199": 1.0}}
    return {"all_results": all_results, "dataset_seed": {d: [777, 888, 999][: len(a)]
                                                         for d, a in acc_by_dataset.items()}}


def write_benchmark(path, archs: list[str], seed: int = 0) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    expected, infos = {}, {}
    for i, arch in enumerate(archs):
        accs = {d: [float(a) for a in rng.uniform(10, 95, size=2)] for d in ("cifar10", "cifar100", "ImageNet16-120")}
        infos[i] = {"less": _results({"cifar10": [1.0]}), "full": _results(accs)}
        expected[arch] = {ours: sum(accs[theirs]) / 2 / 100 for ours, theirs in
                          (("cifar10", "cifar10"), ("cifar100", "cifar100"), ("imagenet16-120", "ImageNet16-120"))}
    torch.save({"meta_archs": archs, "arch2infos": infos, "evaluated_indexes": list(range(len(archs))),
                "total_archs": len(archs)}, path)
    return expected


def test_benchmark_file_gives_mean_test_accuracy_per_dataset(tmp_path):
    archs = [str(random_arch(i)) for i in range(6)]
    expected = write_benchmark(tmp_path / "bench.pth", archs)
    bench = load_benchmark(str(tmp_path / "bench.pth"))
    for arch in archs:
        got = bench.accuracies(arch)
        assert got.keys() == expected[arch].keys()
        assert all(got[d] == pytest.approx(expected[arch][d]) for d in got)
    # numbers saved as numpy scalars load too (data only)
    raw = torch.load(tmp_path / "bench.pth", weights_only=True)
    for info in raw["arch2infos"].values():
        for trial in info["full"]["all_results"].values():
            trial["epochs"] = np.int64(trial["epochs"])
            trial["eval_acc1es"] = {k: np.float64(v) for k, v in trial["eval_acc1es"].items()}
    torch.save(raw, tmp_path / "numpy.pth")
    assert load_benchmark(str(tmp_path / "numpy.pth")).accuracies(archs[0]) == pytest.approx(expected[archs[0]])
    with pytest.raises(ValueError, match="no results for"):
        bench.accuracies(str(random_arch(999)))


class _Custom:
    pass


def test_benchmark_files_that_need_code_are_refused(tmp_path):
    torch.save({"meta_archs": [], "arch2infos": {0: _Custom()}}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused to load") as err:
        load_benchmark(str(tmp_path / "evil.pth"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not found"):
        load_benchmark(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="not a NAS-Bench-201 file"):
        benchmark_from_dict({"something": 1})
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_benchmark(str(tmp_path / "garbage.pth"))


def test_every_epoch_of_an_nb201_search_gets_bench_acc(tmp_path):
    base = dict(search_space="nb201", init_channels=4, layers=1, image_size=8, batch_size=8, synthetic_samples=32,
                eval_steps=1, steps_per_epoch=2, epochs=3, warmup_epochs=1, device="cpu")
    plain = Searcher(search_config("darts", "synthetic", **base))
    cells = []
    while not plain.done:
        cells.append(plain.run_epoch()["genotype"])
    archs = sorted({str(parse_arch(c.split('"')[3])) for c in cells} | {str(random_arch(i)) for i in range(3)})
    expected = write_benchmark(tmp_path / "bench.pth", archs, seed=1)
    with pytest.raises(ValueError, match="needs search_space: nb201"):
        search_config("darts", "synthetic", nb201_benchmark=str(tmp_path / "bench.pth"))
    looked_up = Searcher(search_config("darts", "synthetic", nb201_benchmark=str(tmp_path / "bench.pth"), **base))
    while not looked_up.done:
        m = looked_up.run_epoch()
        arch = str(parse_arch(m["genotype"].split('"')[3]))
        for dataset in ("cifar10", "cifar100", "imagenet16-120"):
            assert m[f"bench_acc_{dataset}"] == pytest.approx(expected[arch][dataset])
