// edgefleet dashboard: draws each <figure class="chart" data-chart=NAME data-src=URL> with
// uPlot from the page's series.json, and redraws it every 15 s. No inline script: the pages'
// Content-Security-Policy allows scripts from this server only.
(function () {
  "use strict";
  var PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
  var plots = {};

  function width(el) {
    return Math.max(280, Math.min(el.clientWidth || 600, 900));
  }

  function draw(el, data) {
    var name = el.dataset.chart;
    var lines = (data.charts || {})[name] || {};
    var labels = Object.keys(lines);
    var old = el.querySelector(".empty");
    if (old) old.remove();
    if (!data.x.length || !labels.length) {
      if (plots[name]) { plots[name].destroy(); delete plots[name]; }
      var p = document.createElement("p");
      p.className = "empty";
      p.textContent = "no data in this window yet";
      el.appendChild(p);
      el.dataset.points = "0";
      return;
    }
    var rows = [data.x].concat(labels.map(function (l) { return lines[l]; }));
    el.dataset.points = String(data.x.length);
    // The x axis is the window asked for (not the span of the points, which may be one).
    el.window = [data.from, data.to];
    if (plots[name] && plots[name].series.length === labels.length + 1) {
      plots[name].setData(rows);
      return;
    }
    if (plots[name]) plots[name].destroy();
    var series = [{}].concat(labels.map(function (l, i) {
      return { label: l, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true };
    }));
    var range = function () { return el.window; };
    plots[name] = new uPlot({ width: width(el), height: 220, series: series,
      scales: { x: { time: true, range: range } } }, rows, el);
  }

  function refresh() {
    var figures = document.querySelectorAll("figure.chart[data-src]");
    var bySrc = {};
    figures.forEach(function (f) { (bySrc[f.dataset.src] = bySrc[f.dataset.src] || []).push(f); });
    Object.keys(bySrc).forEach(function (src) {
      fetch(src, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (data) { bySrc[src].forEach(function (f) { draw(f, data); }); })
        .catch(function () { /* the next round tries again; the page says nothing new */ });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!document.querySelector("figure.chart[data-src]")) return;
    refresh();
    setInterval(refresh, 15000);
    window.addEventListener("resize", function () {
      Object.keys(plots).forEach(function (k) {
        var f = document.querySelector('figure.chart[data-chart="' + k + '"]');
        if (f) plots[k].setSize({ width: width(f), height: 220 });
      });
    });
  });
})();
