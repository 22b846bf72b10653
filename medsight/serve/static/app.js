// MedSight pages: worklist auto-refresh, heat-map toggle and opacity, pending-study refresh.
(function () {
  "use strict";

  function refreshWorklist(table) {
    var url = table.getAttribute("data-refresh");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.status === 401 || r.redirected) { location.href = "/login?next=/worklist"; return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) return;
        document.getElementById("rows").innerHTML = html;
        var stamp = document.getElementById("refreshed");
        if (stamp) stamp.textContent = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function () { /* offline for a moment: try again next tick */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.querySelector("table.worklist[data-refresh]");
    if (table) setInterval(function () { refreshWorklist(table); }, 5000);

    var overlay = document.getElementById("overlay");
    var toggle = document.getElementById("toggle-heatmap");
    var slider = document.getElementById("opacity");
    var out = document.getElementById("opacity-value");
    if (overlay && toggle) {
      toggle.addEventListener("change", function () { overlay.classList.toggle("hidden", !toggle.checked); });
    }
    if (overlay && slider) {
      slider.addEventListener("input", function () {
        overlay.style.opacity = String(slider.value / 100);
        if (out) out.textContent = slider.value + "%";
      });
    }
    var study = document.querySelector(".study[data-status]");
    if (study && (study.dataset.status === "queued" || study.dataset.status === "analysing")) {
      setTimeout(function () { location.reload(); }, 2000);
    }
  });
})();
