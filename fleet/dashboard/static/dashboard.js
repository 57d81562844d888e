// Live pages: poll the page's JSON view and redraw it in place (no reload).
// Hand-written (no framework, no CDN, nothing inline, so the Content-Security-Policy
// "script-src 'self'" holds). A page opts in with <section id="live" data-live-url="..."
// data-live-view="deployment|overview|devices">; the view names the drawing below and how
// often to fetch: a rollout every 1.5 s while it runs (10 s after), the overview and the
// devices every 2 s. Text is set with textContent only, never parsed as HTML.
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
  function node(tag, attrs, children) {
    var el = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    (children || []).forEach(function (c) {
      el.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return el;
  }
  function when(iso) { return iso ? iso.slice(0, 19).replace("T", " ") : ""; }

  // Make the children of `parent` one per item, in order, keyed by the attribute `key`:
  // existing ones are kept (and updated), missing ones made, stale ones removed; children
  // without the key (class "empty") are placeholders, shown only while there are no items.
  function sync(parent, items, key, keyOf, make, update, placeholder) {
    var have = {};
    var empty = null;
    Array.prototype.slice.call(parent.children).forEach(function (child) {
      var k = child.getAttribute(key);
      if (k === null) { empty = child; } else { have[k] = child; }
    });
    if (empty && items.length) { empty.remove(); empty = null; }
    items.forEach(function (item, i) {
      var k = String(keyOf(item));
      var child = have[k];
      if (child) { delete have[k]; } else { child = make(item); child.setAttribute(key, k); }
      update(child, item);
      if (parent.children[i] !== child) { parent.insertBefore(child, parent.children[i] || null); }
    });
    Object.keys(have).forEach(function (k) { have[k].remove(); });
    if (!items.length && !empty) { parent.appendChild(placeholder()); }
  }

  function drawDeployment(view) {
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
  }

  function deviceLink(id) { return node("a", { href: "/dashboard/devices/" + encodeURIComponent(id) }, [id]); }
  function emptyRow(columns, text) {
    return node("tr", { "class": "empty" }, [node("td", { colspan: String(columns) }, [text])]);
  }

  function drawOverview(view) {
    Object.keys(view.counts).forEach(function (k) { set(document.getElementById("count-" + k), view.counts[k]); });
    var phases = Object.keys(view.phases).map(function (p) { return { phase: p, n: view.phases[p] }; });
    sync(document.getElementById("phases"), phases, "data-phase",
      function (p) { return p.phase; },
      function () { return node("span"); },
      function (el, p) { badge(el, "phase-", p.phase); set(el, p.phase + " " + p.n); },
      function () { return node("span", { "class": "empty" }, ["No deployments yet."]); });
    sync(document.querySelector("#rollouts tbody"), view.rollouts, "data-deployment",
      function (d) { return d.id; },
      function (d) {
        return node("tr", {}, [
          node("td", {}, [node("a", { "data-field": "name", href: "/dashboard/deployments/" + d.id })]),
          node("td", { "data-field": "model" }),
          node("td", {}, [node("span", { "data-field": "phase" })]),
          node("td", { "data-field": "stage" }), node("td", { "data-field": "devices" })]);
      },
      function (row, d) {
        set(field(row, "name"), d.name);
        set(field(row, "model"), d.model_name);
        badge(field(row, "phase"), "phase-", d.phase);
        set(field(row, "stage"), (d.stage + 1) + " / " + d.stages);
        set(field(row, "devices"), d.devices);
      },
      function () { return emptyRow(5, "No rollout running."); });
    sync(document.querySelector("#top-drift tbody"), view.top_drift, "data-series",
      function (p) { return [p.device_id, p.model_name, p.model_version, p.metric].join("|"); },
      function (p) {
        return node("tr", {}, [node("td", {}, [deviceLink(p.device_id)]),
          node("td", {}, [p.model_name + " v" + p.model_version]), node("td", {}, [p.metric]),
          node("td", { "class": "num", "data-field": "score" }), node("td", { "data-field": "window-end" })]);
      },
      function (row, p) {
        set(field(row, "score"), p.score.toFixed(4));
        set(field(row, "window-end"), when(p.window_end));
      },
      function () { return emptyRow(5, "No drift scores posted yet."); });
    sync(document.getElementById("out-of-sync"), view.out_of_sync, "data-device",
      function (id) { return id; },
      function (id) { return node("li", {}, [deviceLink(id)]); },
      function () { },
      function () { return node("li", { "class": "empty" }, ["Every device runs what it should."]); });
  }

  function drawDevices(view) {
    set(document.getElementById("shown"), view.shown);
    set(document.getElementById("total"), view.total);
    var more = document.getElementById("more");
    more.hidden = !view.more;
    set(field(more, "more"), view.more);
    sync(document.querySelector("#devices tbody"), view.rows, "data-device",
      function (r) { return r.device_id; },
      function (r) {
        var cells = [node("td", {}, [deviceLink(r.device_id)]), node("td", {}, [node("span", { "data-field": "status" })])];
        ["profile", "group", "models", "sync", "last-seen"].forEach(function (name) {
          cells.push(node("td", { "data-field": name }));
        });
        return node("tr", {}, cells);
      },
      function (row, r) {
        badge(field(row, "status"), "status-", r.status);
        set(field(row, "profile"), r.profile);
        set(field(row, "group"), r.group || "");
        set(field(row, "models"), r.models.join(", ") || "\u2014");
        set(field(row, "sync"), r.in_sync ? "in sync" : "pending");
        var seen = field(row, "last-seen");
        set(seen, r.last_seen_age);
        if (seen.getAttribute("title") !== (r.last_seen || "")) { seen.setAttribute("title", r.last_seen || ""); }
      },
      function () { return emptyRow(7, "No devices match."); });
  }

  var kinds = {
    deployment: { draw: drawDeployment, every: function (v) { return v.terminal ? 10000 : 1500; } },
    overview: { draw: drawOverview, every: function () { return 2000; } },
    devices: { draw: drawDevices, every: function () { return 2000; } }
  };
  var kind = kinds[root.getAttribute("data-live-view")] || kinds.deployment;

  function poll() {
    if (document.hidden) { window.setTimeout(poll, 1000); return; }  // a background tab waits
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401) { window.location = "/dashboard/login?next=" + encodeURIComponent(window.location.pathname + window.location.search); }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (view) {
        kind.draw(view);
        root.setAttribute("data-version", view.updated_at);
        set(status, view.terminal ? "finished" : "live");
        window.setTimeout(poll, kind.every(view));
      })
      .catch(function (err) {
        set(status, "reconnecting (" + err.message + ")");
        window.setTimeout(poll, 5000);
      });
  }
  window.setTimeout(poll, kind.every({}));
}());
