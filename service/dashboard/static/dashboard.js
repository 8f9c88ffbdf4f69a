// prunegraph dashboard: live progress of unfinished jobs, no reload (vendored; no dependencies).
// Every element with data-poll-url polls GET /v1/jobs/{id} (the token travels in the
// HttpOnly cookie) and updates its status, progress bar and percentage. When the job is done
// or failed, an element that also has data-part-url gets that fragment (the report part)
// fetched and swapped in; rows of the job list just show the final status.
(function () {
  "use strict";
  var INTERVAL_MS = 1000;
  var FINAL = { done: true, failed: true };

  function setText(root, role, text) {
    var el = root.querySelector('[data-role="' + role + '"]');
    if (el) { el.textContent = text; }
    return el;
  }

  function show(root, job) {
    var status = setText(root, "status", job.status);
    if (status) { status.className = "status status-" + job.status; }
    var bar = root.querySelector('[data-role="progress"]');
    if (bar) { bar.value = job.progress; }
    setText(root, "percent", Math.round(job.progress * 100) + " %");
  }

  function swapPart(root) {
    fetch(root.dataset.partUrl, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        root.innerHTML = html;
        root.removeAttribute("data-poll-url");
        root.dispatchEvent(new CustomEvent("prunegraph:updated", { bubbles: true }));
      })
      .catch(function () { window.setTimeout(function () { swapPart(root); }, INTERVAL_MS); });
  }

  function poll(root) {
    fetch(root.dataset.pollUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (job) {
        show(root, job);
        if (FINAL[job.status]) {
          if (root.dataset.partUrl) { swapPart(root); } else { root.removeAttribute("data-poll-url"); }
          return;
        }
        window.setTimeout(function () { poll(root); }, INTERVAL_MS);
      })
      .catch(function () { window.setTimeout(function () { poll(root); }, 3 * INTERVAL_MS); });
  }

  function start() {
    var roots = document.querySelectorAll("[data-poll-url]");
    for (var i = 0; i < roots.length; i++) { poll(roots[i]); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
