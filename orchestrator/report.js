// Marks every figure with its laid-out size once the page has loaded (data-size="WxH:marks") and the count of its
// texts that overlap another one (data-overlaps: two upright texts of the figure, or a legend's text and any
// other), and the body with the count of figures that have a non-empty drawing (data-figures) and how many pixels
// the page is wider than the window (data-overflow): a headless browser's DOM dump shows them (the tests read it).
window.addEventListener('load', function () {
  var figs = document.querySelectorAll('figure.fig'), ok = 0;
  function upright(t) {
    for (var e = t; e && e.tagName.toLowerCase() !== 'svg'; e = e.parentElement) {
      var m = /rotate\(\s*(-?[\d.]+)/.exec(e.getAttribute('transform') || '');
      if (m && parseFloat(m[1]) !== 0) return false;
    }
    return true;
  }
  function overlap(a, b) {
    var pad = 0.5;  // touching boxes are fine
    return a.left + pad < b.right && b.left + pad < a.right && a.top + pad < b.bottom && b.top + pad < a.bottom;
  }
  figs.forEach(function (f) {
    var g = f.querySelector('svg'), r = g ? g.getBoundingClientRect() : {width: 0, height: 0};
    var marks = g ? g.querySelectorAll('path,text,use,image').length : 0;
    var texts = g ? Array.prototype.filter.call(g.querySelectorAll('text'), function (t) {
      return t.textContent.trim() !== '';
    }) : [];
    var boxes = texts.map(function (t) {
      return {box: t.getBoundingClientRect(), upright: upright(t), legend: !!t.closest('g.mpl-legend')};
    });
    var overlaps = 0;
    for (var i = 0; i < boxes.length; i++) {
      for (var j = i + 1; j < boxes.length; j++) {
        var a = boxes[i], b = boxes[j];
        var checked = (a.legend !== b.legend) || (a.upright && b.upright && !a.legend);
        if (checked && overlap(a.box, b.box)) overlaps += 1;
      }
    }
    f.setAttribute('data-size', Math.round(r.width) + 'x' + Math.round(r.height) + ':' + marks);
    f.setAttribute('data-overlaps', String(overlaps));
    if (r.width > 0 && r.height > 0 && marks > 0) ok += 1;
  });
  document.body.setAttribute('data-figures', figs.length + ':' + ok);
  document.body.setAttribute('data-overflow',
                             String(Math.max(0, document.documentElement.scrollWidth - window.innerWidth)));
});
