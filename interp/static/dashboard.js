/* villes dashboards: draws a unit page or the index from the data inlined in the page.
   Everything is local: plotly.min.js sits beside this file, no request leaves the folder. */
(function () {
  "use strict";

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k);
    return e;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "\u2014";
    const d = digits === undefined ? 3 : digits;
    if (x !== 0 && (Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3)) return x.toExponential(2);
    return String(+x.toFixed(d));
  }

  function pct(x) {
    if (x === null || x === undefined) return "\u2014";
    const p = 100 * x;
    return (p !== 0 && p < 0.1 ? p.toExponential(1) : p.toFixed(p < 10 ? 2 : 1)) + "%";
  }

  // how a symbol is drawn: visible markers for the characters that are easy to miss
  const SHOW = { " ": "\u2423" };
  const MARKED = new Set([" ", "-", "'", "\u2019"]);

  function actColour(v, scale) {
    const a = Math.min(1, Math.abs(v) / (scale || 1));
    if (a < 0.01) return null;
    return v > 0 ? `rgba(255,127,14,${a.toFixed(3)})` : `rgba(31,119,180,${a.toFixed(3)})`;
  }

  function effectColour(v, scale) {
    const a = Math.min(1, Math.abs(v) / (scale || 1));
    if (a < 0.01) return null;
    return v > 0 ? `rgba(44,160,44,${a.toFixed(3)})` : `rgba(148,103,189,${a.toFixed(3)})`;
  }

  function marker(text, title) {
    return el("span", { class: "tok mk", title: title, text: text });
  }

  function cell(ch, colour, title) {
    const s = el("span", { class: MARKED.has(ch) ? "tok mk" : "tok", title: title, text: SHOW[ch] || ch });
    if (colour) s.style.background = colour;
    return s;
  }

  // a whole name, each character coloured by the unit's activation there
  function nameLine(ex, scale) {
    const row = el("div", { class: "name" });
    row.append(marker("^", "<bos> (beginning; not counted)"));
    const v = ex.v;
    let peak = -Infinity;
    for (let i = 0; i < ex.n.length; i++) {
      const ch = ex.n[i];
      row.append(cell(ch, actColour(v[i], scale), `${JSON.stringify(ch)} at ${i + 1}: ${fmt(v[i])}`));
      if (v[i] > peak) peak = v[i];
    }
    row.append(marker("$", "<eos> (end; not counted)"));
    row.append(el("span", { class: "meta", text: ` ${fmt(peak)}${ex.g ? " \u00b7 " + ex.g : ""}` }));
    return row;
  }

  // a name coloured by log p(clean) - log p(ablated) of each predicted symbol (the characters, then <eos>)
  function effectLine(ex, scale) {
    const row = el("div", { class: "name" });
    row.append(marker("^", "<bos>: nothing is predicted onto it"));
    const d = ex.d;
    for (let i = 0; i < d.length; i++) {
      const ch = i < ex.n.length ? ex.n[i] : null;
      const title = `${ch === null ? "<eos>" : JSON.stringify(ch)}: \u0394 log p = ${fmt(d[i])}`;
      if (ch === null) {
        const m = marker("$", title);
        const c = effectColour(d[i], scale);
        if (c) m.style.background = c;
        row.append(m);
      } else row.append(cell(ch, effectColour(d[i], scale), title));
    }
    return row;
  }

  function section(app, title, note) {
    const s = el("section", {}, el("h2", { text: title }));
    if (note) s.append(el("p", { class: "note", text: note }));
    app.append(s);
    return s;
  }

  function examples(parent, list, scale, empty) {
    if (!list || !list.length) {
      parent.append(el("p", { class: "note", text: empty || "none" }));
      return;
    }
    const box = el("div", { class: "names" });
    for (const ex of list) box.append(nameLine(ex, scale));
    parent.append(box);
  }

  const PLOT_CFG = { displaylogo: false, responsive: true, displayModeBar: false };

  function plot(parent, traces, layout) {
    const div = el("div", { class: "plot" });
    parent.append(div);
    const base = {
      margin: { l: 50, r: 10, t: 30, b: 40 },
      height: 260,
      font: { size: 11 },
      bargap: 0.1,
      showlegend: false,
    };
    Plotly.newPlot(div, traces, Object.assign(base, layout), PLOT_CFG);
    return div;
  }

  function kindName(d) {
    return { feature: "Feature", neuron: "Neuron", direction: "Direction" }[d.kind] || d.kind;
  }

  function renderUnit(d) {
    const app = document.getElementById("app");
    document.title = `${d.set}:${d.index}`;
    const nav = el("nav", {}, el("a", { href: "../../index.html", text: "\u2190 all units" }));
    if (d.nav.prev !== null) nav.append(" \u00b7 ", el("a", { href: d.nav.prev, text: "previous" }));
    if (d.nav.next !== null) nav.append(" \u00b7 ", el("a", { href: d.nav.next, text: "next" }));
    app.append(nav);
    app.append(el("h1", { text: `${kindName(d)} ${d.set}:${d.index}` }));
    app.append(el("p", { class: "sub", text: `${d.kind} ${d.index} read at ${d.hook}` }));

    const concept = el("div", { class: "concept" }, el("b", { text: "Concept: " }));
    if (d.label) concept.append(`${d.label} (score ${fmt(d.score)})`);
    else concept.append(el("span", { class: "note", text: "not scored yet (filled in by the monosemanticity scores)" }));
    app.append(concept);

    const st = d.stats;
    const stats = el("div", { class: "stats" });
    const item = (k, v) => stats.append(el("span", {}, el("b", { text: k + " " }), v));
    item("density", pct(st.density));
    item("names where it fires", pct(st.active_names));
    item("max", fmt(st.max));
    if (d.kind !== "feature") item("min", fmt(st.min));
    item("mean", fmt(st.mean));
    item("mean when active", fmt(st.mean_active));
    item("characters", String(st.n_tokens));
    app.append(stats);

    if (d.flags.includes("dead")) {
      app.append(
        el("div", {
          class: "banner dead",
          text: `Dead: never active on the ${st.n_tokens} characters of the corpus split. Nothing here describes it.`,
        })
      );
      return;
    }
    if (d.flags.includes("dense")) {
      app.append(
        el("div", {
          class: "banner dense",
          text: `Dense: active on ${pct(st.density)} of characters (flagged above ${pct(d.dense_threshold)}); ` +
            "its examples are common names, not a selective pattern.",
        })
      );
    }

    let s = section(app, "Top activations", "Whole names; each character coloured by the activation there (hover for " +
      "values). ^ and $ mark the beginning and the end, \u2423 a space. The number is the name's peak.");
    examples(s, d.top, d.scale);
    if (d.bottom) {
      s = section(app, "Most negative activations");
      examples(s, d.bottom, d.scale, "never negative");
    }
    s = section(app, "Activation bands", "Equal-width intervals of (0, max]; names are placed by their peak and " +
      "sampled uniformly within each interval.");
    for (const b of d.bands) {
      if (!b.ex.length && b.pct === 0) continue;
      s.append(el("h3", { text: `interval ${fmt(b.lo)}\u2013${fmt(b.hi)} contains ${fmt(b.pct, 1)}% of the names where it fires` }));
      examples(s, b.ex, d.scale);
    }
    s = section(app, "Random names where it fires");
    examples(s, d.random, d.scale);

    s = section(app, "Activation histogram", d.hist.nonzero_only
      ? `Non-zero activations only; it is zero on ${pct(1 - st.density)} of characters.`
      : "Every character; log scale.");
    const h = d.hist;
    plot(s, [{ type: "bar", x: h.x, y: h.counts, width: h.w.map((w) => w * 0.95),
      marker: { color: h.x.map((x) => (x < 0 ? "#1f77b4" : "#ff7f0e")) },
      customdata: h.x.map((x, i) => [x - h.w[i] / 2, x + h.w[i] / 2]),
      hovertemplate: "%{customdata[0]:.3f} to %{customdata[1]:.3f}: %{y}<extra></extra>" }],
    { xaxis: { title: "activation" }, yaxis: { title: "characters", type: d.hist.nonzero_only ? "linear" : "log" } });

    s = section(app, "Logit effect on the next character",
      `Left: through the rest of the model \u2014 the change in logits at the peak character when the unit is ` +
      `ablated, per unit of activation, averaged over ${d.logits.n} top names; the final LayerNorm runs on the ` +
      "ablated stream with its real scale. Right: the raw direct path (direction \u00b7 W_U, no normalization). " +
      "Both centred over the predictable symbols.");
    const grid = el("div", { class: "two" });
    s.append(grid);
    const bar = (y, title, colour) => plot(grid, [{ type: "bar", x: d.logits.labels, y: y,
      marker: { color: y.map((v) => (v >= 0 ? colour : "#9467bd")) }, hovertemplate: "%{x}: %{y:.3f}<extra></extra>" }],
    { title: { text: title, font: { size: 12 } }, xaxis: { type: "category", tickangle: 0 } });
    bar(d.logits.through, "through the rest of the model", "#2ca02c");
    if (d.logits.raw) bar(d.logits.raw, "raw direction \u00b7 W_U", "#1f77b4");
    else grid.append(el("p", { class: "note", text: "This hook has no linear path to the residual stream." }));

    s = section(app, "Where it fires", "Mean activation (hover: how often it is active, and how many characters).");
    const by = (data, title, xtype) => plot(s, [{ type: "bar", x: data.labels, y: data.mean,
      customdata: data.rate.map((r, i) => [r * 100, data.count[i]]),
      hovertemplate: "%{x}: mean %{y:.3f}, active %{customdata[0]:.1f}% of %{customdata[1]}<extra></extra>",
      marker: { color: "#ff7f0e" } }],
    { title: { text: title, font: { size: 12 } }, xaxis: { type: xtype, tickangle: 0 } });
    by(d.by_char, "by current character", "category");
    by(d.by_prev, "by previous character (^ = first letter)", "category");
    by(d.by_pos, "by position in the name", "linear");
    if (d.regions) {
      plot(s, [
        { type: "bar", name: "its activation mass", x: d.regions.labels, y: d.regions.share.map((v) => 100 * v),
          marker: { color: "#ff7f0e" }, hovertemplate: "%{x}: %{y:.2f}%<extra>unit</extra>" },
        { type: "bar", name: "characters of the corpus", x: d.regions.labels, y: d.regions.baseline.map((v) => 100 * v),
          marker: { color: "#bbbbbb" }, hovertemplate: "%{x}: %{y:.2f}%<extra>corpus</extra>" },
      ], { title: { text: "share by region of France of the name (%)", font: { size: 12 } }, barmode: "group",
        showlegend: true, legend: { orientation: "h", y: 1.15 }, height: 320, margin: { l: 50, r: 10, t: 40, b: 110 },
        xaxis: { tickangle: -35 } });
    }

    s = section(app, "Ablation", "Each symbol coloured by log p(clean) \u2212 log p(unit ablated at every character): " +
      "green where the unit made that character (or the end $) more likely, purple less. Hover for values.");
    if (d.ablation.length) {
      let sc = 1e-6;
      for (const ex of d.ablation) for (const v of ex.d) sc = Math.max(sc, Math.abs(v));
      const box = el("div", { class: "names" });
      for (const ex of d.ablation) box.append(effectLine(ex, sc));
      s.append(box, el("p", { class: "note", text: `colour scale: \u00b1${fmt(sc)} nats` }));
    } else s.append(el("p", { class: "note", text: "no examples" }));

    if (d.generated) {
      s = section(app, "Names generated with the unit clamped", "At every position, <bos> included; row k of " +
        "each column uses the same random numbers, so differences come from the clamp.");
      const t = el("table", { class: "gen" });
      const head = el("tr", {}, el("th", { text: "unclamped" }));
      d.generated.values.forEach((v, i) => head.append(el("th", { text: `= ${fmt(v)} (${d.generated.multiples[i]}\u00d7 max)` })));
      t.append(head);
      for (let k = 0; k < d.generated.baseline.length; k++) {
        const tr = el("tr", {}, el("td", { text: d.generated.baseline[k] }));
        for (const col of d.generated.names) tr.append(el("td", { text: col[k] }));
        t.append(tr);
      }
      s.append(t);
    }

    s = section(app, "Neighbours");
    const titles = { cosine: d.kind === "feature" ? "nearest features by decoder cosine" : "nearest by output-weight cosine",
      neurons: "most correlated MLP neurons (Pearson)" };
    const grid2 = el("div", { class: "two" });
    s.append(grid2);
    for (const [k, rows] of Object.entries(d.neighbours || {})) {
      const box = el("div", {}, el("h3", { text: titles[k] || `most correlated features (${k.split(":")[1]})` }));
      const ul = el("ul", { class: "nbr" });
      for (const [text, href, v] of rows) {
        ul.append(el("li", {}, href ? el("a", { href: href, text: text }) : text, el("span", { class: "meta", text: ` ${fmt(v)}` })));
      }
      box.append(ul);
      grid2.append(box);
    }
  }

  function renderIndex(d) {
    const app = document.getElementById("app");
    app.append(el("h1", { text: d.title }));
    app.append(el("p", { class: "sub", text: `${d.rows.length} units over the ${d.n_names} names of split "${d.split}"` }));
    const sets = el("table", { class: "sets" });
    sets.append(el("tr", {}, ...["set", "hook", "kind", "units", "dead", "dense"].map((h) => el("th", { text: h }))));
    for (const s of d.sets) sets.append(el("tr", {}, ...[s.id, s.hook, s.kind, s.units, s.dead, s.dense].map((v) => el("td", { text: String(v) }))));
    app.append(sets);
    const search = el("input", { type: "search", id: "search", placeholder: "search: unit, flag, label, name\u2026" });
    const count = el("span", { id: "count", class: "meta" });
    app.append(el("div", { class: "tools" }, search, " ", count));
    const table = el("table", { id: "units", class: "units" });
    const head = el("tr");
    d.columns.forEach((c, i) => head.append(el("th", { text: c, "data-col": String(i), title: "sort" })));
    table.append(el("thead", {}, head));
    const body = el("tbody");
    table.append(body);
    app.append(table);
    const rows = d.rows.map((r) => {
      const tr = el("tr");
      r.forEach((v, i) => {
        let content;
        if (i === 1) content = el("a", { href: `units/${r[0]}/${r[1]}.html`, text: String(v) });
        else if (i === 3) content = pct(v);
        else if (i === 4 || i === 5 || i === 8) content = fmt(v);
        else content = v === null ? "\u2014" : String(v);
        tr.append(el("td", {}, content));
      });
      body.append(tr);
      return { tr: tr, data: r, text: r.map((v) => (v === null ? "" : String(v))).join(" ").toLowerCase() };
    });
    let sortCol = null, asc = true;
    const show = () => {
      const q = search.value.trim().toLowerCase();
      let n = 0;
      for (const r of rows) {
        const ok = !q || q.split(/\s+/).every((w) => r.text.includes(w));
        r.tr.style.display = ok ? "" : "none";
        if (ok) n++;
      }
      count.textContent = `${n} of ${rows.length} units`;
    };
    head.addEventListener("click", (ev) => {
      const c = ev.target.getAttribute("data-col");
      if (c === null) return;
      const col = +c;
      asc = sortCol === col ? !asc : col === 3 || col === 4 || col === 5 || col === 8 ? false : true;
      sortCol = col;
      const key = (r) => r.data[col];
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === y) return 0;
        if (x === null || x === "") return 1;
        if (y === null || y === "") return -1;
        const r = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return asc ? r : -r;
      });
      for (const r of rows) body.append(r.tr);
      for (const th of head.children) th.classList.toggle("sorted", th === ev.target);
    });
    search.addEventListener("input", show);
    show();
  }

  window.villesDashboard = {
    render: function (d) {
      if (document.body.classList.contains("index")) renderIndex(d);
      else renderUnit(d);
    },
  };
})();
