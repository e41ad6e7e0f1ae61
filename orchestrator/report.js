// Marks every figure with its laid-out size once the page has loaded (data-size="WxH:marks") and the body with
// the count of figures that have a non-empty drawing: a headless browser's DOM dump shows them (the tests read it).
window.addEventListener('load', function () {
  var figs = document.querySelectorAll('figure.fig'), ok = 0;
  figs.forEach(function (f) {
    var g = f.querySelector('svg'), r = g ? g.getBoundingClientRect() : {width: 0, height: 0};
    var marks = g ? g.querySelectorAll('path,text,use,image').length : 0;
    f.setAttribute('data-size', Math.round(r.width) + 'x' + Math.round(r.height) + ':' + marks);
    if (r.width > 0 && r.height > 0 && marks > 0) ok += 1;
  });
  document.body.setAttribute('data-figures', figs.length + ':' + ok);
});
