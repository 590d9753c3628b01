// Draws each <figure class="chart" data-src data-series data-y> as an SVG bar chart from
// the hub's JSON. The table beside each chart holds the same numbers (the text
// alternative); without this script the page loses nothing but the picture.
"use strict";
(function () {
  var NS = "http://www.w3.org/2000/svg";
  function el(name, attrs) {
    var e = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    return e;
  }
  function draw(fig, rows, key) {
    var w = 600, h = 160, pad = 18, n = rows.length;
    var svg = el("svg", { viewBox: "0 0 " + w + " " + h, role: "img", preserveAspectRatio: "none" });
    svg.setAttribute("aria-label", fig.getAttribute("aria-label") || "chart");
    var max = 0;
    rows.forEach(function (r) { max = Math.max(max, Number(r[key]) || 0); });
    var bw = n ? (w - 2 * pad) / n : 0;
    rows.forEach(function (r, i) {
      var v = Number(r[key]) || 0;
      var bh = max ? (h - 2 * pad) * v / max : 0;
      var rect = el("rect", { x: pad + i * bw + 1, y: h - pad - bh, width: Math.max(bw - 2, 1), height: bh });
      var t = el("title", {});
      t.textContent = (r.day || r.at || "") + ": " + v;
      rect.appendChild(t);
      svg.appendChild(rect);
    });
    fig.appendChild(svg);
    var cap = document.createElement("figcaption");
    cap.className = "muted";
    cap.textContent = "Tallest bar: " + max + " " + key + " (" + (n ? (rows[0].day || rows[0].at) + " to " + (rows[n - 1].day || rows[n - 1].at) : "no data") + ")";
    fig.appendChild(cap);
  }
  document.querySelectorAll("figure.chart[data-src]").forEach(function (fig) {
    fetch(fig.getAttribute("data-src"), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (j) {
        var rows = j && j[fig.getAttribute("data-series")];
        if (Array.isArray(rows)) { draw(fig, rows, fig.getAttribute("data-y")); }
      })
      .catch(function () {});
  });
})();
