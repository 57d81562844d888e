// Live rollout progress: poll the deployment's JSON view and redraw the waves and job states.
// Hand-written (no framework, no CDN): a fetch every 1.5 s while the rollout runs, 10 s after.
(function () {
  "use strict";
  var root = document.getElementById("live");
  if (!root) { return; }
  var url = root.getAttribute("data-live-url");
  var status = document.getElementById("live-status");

  function set(el, text) { if (el && el.textContent !== String(text)) { el.textContent = text; } }
  function badge(el, prefix, value) {
    if (!el) { return; }
    set(el, value);
    el.className = "badge " + prefix + String(value).toLowerCase();
  }
  function field(row, name) { return row.querySelector('[data-field="' + name + '"]'); }

  function draw(view) {
    badge(document.getElementById("phase"), "phase-", view.phase);
    set(document.getElementById("reason"), view.reason || "");
    set(document.getElementById("overall"), view.percent);
    set(document.getElementById("updated"), view.updated_at);
    document.getElementById("overall-bar").style.width = view.percent + "%";
    view.waves.forEach(function (w) {
      var row = root.querySelector('tr[data-wave="' + w.index + '"]');
      if (!row) { return; }
      var c = w.counts;
      badge(field(row, "status"), "wave-", w.status);
      field(row, "bar").style.width = w.percent + "%";
      set(field(row, "progress"), w.finished + "/" + w.total);
      set(field(row, "succeeded"), w.succeeded);
      set(field(row, "running"), c.QUEUED + c.IN_PROGRESS);
      set(field(row, "failed"), c.FAILED + c.CANCELED + c.ROLLED_BACK);
    });
    view.devices.forEach(function (d) {
      var row = root.querySelector('tr[data-device="' + CSS.escape(d.device_id) + '"]');
      if (!row) { return; }
      badge(field(row, "state"), "job-", d.state);
      set(field(row, "attempts"), d.attempts);
      set(field(row, "reason"), d.reason || "");
      set(field(row, "rollback"), d.rollback_state || "");
    });
    root.setAttribute("data-version", view.updated_at);
  }

  function poll() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401) { window.location = "/dashboard/login?next=" + encodeURIComponent(window.location.pathname); }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (view) {
        draw(view);
        set(status, view.terminal ? "finished" : "live");
        window.setTimeout(poll, view.terminal ? 10000 : 1500);
      })
      .catch(function (err) {
        set(status, "reconnecting (" + err.message + ")");
        window.setTimeout(poll, 5000);
      });
  }
  window.setTimeout(poll, 1500);
}());
