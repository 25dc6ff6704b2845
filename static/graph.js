// The attribution graph page: node cards, pinning, supernodes, node interventions; all state in the URL
// (reload = same view; edits as edit=NODE:scale:K / edit=NODE:set:V, which the server runs on the worker).
(function () {
  const dataEl = document.getElementById("graph-data");
  if (!dataEl) return;
  const data = JSON.parse(dataEl.textContent);
  const byId = new Map(data.nodes.map(n => [n.node_id, n]));
  const svg = document.getElementById("graph-svg");
  const url = new URL(window.location.href);
  const list = k => (url.searchParams.get(k) || "").split(",").filter(Boolean);
  let pinned = list("pinned");
  let groups = (url.searchParams.get("groups") || "").split(";").filter(s => s.includes(":"))
    .map(s => { const i = s.indexOf(":"); return { label: s.slice(0, i), members: s.slice(i + 1).split(",").filter(Boolean) }; });

  const esc = s => String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const fmt = v => (v === null || v === undefined) ? "–" : (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(3));

  function save() {
    pinned.length ? url.searchParams.set("pinned", pinned.join(",")) : url.searchParams.delete("pinned");
    groups.length ? url.searchParams.set("groups", groups.map(g => g.label + ":" + g.members.join(",")).join(";"))
                  : url.searchParams.delete("groups");
    history.replaceState(null, "", url.toString());
  }

  function renderSide() {
    document.getElementById("pinned-list").innerHTML = pinned.map(p => `<li data-id="${esc(p)}">${esc(p)}</li>`).join("");
    document.getElementById("group-list").innerHTML =
      groups.map(g => `<li><b>${esc(g.label)}</b>: ${g.members.map(esc).join(", ")}</li>`).join("");
    svg.querySelectorAll("g.node").forEach(el => el.classList.toggle("pinned", pinned.includes(el.dataset.id)));
  }

  function strongest(id, dir) {
    return data.links.filter(l => (dir === "in" ? l.target : l.source) === id)
      .sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 6);
  }

  function card(id) {
    const n = byId.get(id);
    if (!n) return;
    svg.querySelectorAll("g.node.selected").forEach(el => el.classList.remove("selected"));
    const el = svg.querySelector(`g.node[data-id="${CSS.escape(id)}"]`);
    if (el) el.classList.add("selected");
    svg.querySelectorAll("line.link").forEach(l => l.classList.toggle("hot", l.dataset.s === id || l.dataset.t === id));
    let html = `<h2>${esc(n.feature_type)} <span class="muted">${esc(id)}</span></h2>`;
    html += `<p>layer ${esc(n.layer)}, position ${n.ctx_idx} (${esc(data.tokens[n.ctx_idx] || "")})`;
    if (n.activation !== null && n.activation !== undefined) html += `, activation ${fmt(n.activation)}`;
    if (n.influence !== null && n.influence !== undefined) html += `, cumulative influence ${fmt(n.influence)}`;
    html += `</p>`;
    if (n.clerp) html += `<p>${esc(n.clerp)}</p>`;
    if (n.feature_type === "cross layer transcoder") {
      const feat = id.split("_")[1];
      const sid = data.sae_ids[n.layer];
      const c = sid ? data.cards[sid + "/" + feat] : null;
      if (c) html += `<p>top tokens: ${c.top_tokens.map(t => `<code>${esc(t)}</code>`).join(" ")}</p>`;
      if (sid) html += `<p><a href="/sae/${encodeURIComponent(sid)}/feature/${encodeURIComponent(feat)}">feature page of ${esc(sid)} #${esc(feat)}</a></p>`;
    }
    const chk = data.checks[id];
    if (chk) html += `<p>ablated in the real model: true Δ ${fmt(chk.true)}, graph estimate ${fmt(chk.estimate)} (${chk.agree ? "agree" : "disagree"})</p>`;
    for (const [dir, label] of [["in", "strongest inputs"], ["out", "strongest outputs"]]) {
      const ls = strongest(id, dir);
      if (ls.length) html += `<h3>${label}</h3><ul>` + ls.map(l => {
        const o = dir === "in" ? l.source : l.target;
        return `<li><a href="#" data-goto="${esc(o)}">${esc(o)}</a> ${fmt(l.weight)}</li>`;
      }).join("") + `</ul>`;
    }
    html += `<button type="button" id="pin-btn">${pinned.includes(id) ? "unpin" : "pin"}</button>`;
    const editable = n.feature_type === "cross layer transcoder" && /^\d+_\d+_\d+$/.test(id) && editList;
    if (editable) html += `<p class="edit-controls">intervene: <label>× <input id="edit-scale" type="number" step="any" value="0" size="5" aria-label="multiply the activation by"></label>
      <button type="button" id="add-scale">add ×k</button>
      <label>= <input id="edit-set" type="number" step="any" value="0" size="5" aria-label="set the activation to"></label>
      <button type="button" id="add-set">add = value</button></p>`;
    const box = document.getElementById("node-card");
    box.innerHTML = html;
    box.querySelectorAll("a[data-goto]").forEach(a => a.addEventListener("click", e => { e.preventDefault(); select(a.dataset.goto); }));
    document.getElementById("pin-btn").addEventListener("click", () => { togglePin(id); card(id); });
    if (editable) {
      document.getElementById("add-scale").addEventListener("click", () => addEdit(id, "scale", document.getElementById("edit-scale").value));
      document.getElementById("add-set").addEventListener("click", () => addEdit(id, "set", document.getElementById("edit-set").value));
    }
  }

  // node interventions: edit=NODE:MODE:VALUE, one per node (a new one for a node replaces its old one)
  const editList = document.getElementById("edit-list");
  let edits = url.searchParams.getAll("edit");
  function saveEdits() {
    url.searchParams.delete("edit");
    edits.forEach(e => url.searchParams.append("edit", e));
    history.replaceState(null, "", url.toString());
    if (!editList) return;
    editList.innerHTML = edits.map((e, i) => `<li data-edit="${esc(e)}">${esc(e)} <button type="button" data-drop="${i}" aria-label="remove">×</button></li>`).join("");
    editList.querySelectorAll("button[data-drop]").forEach(b => b.addEventListener("click", () => {
      edits.splice(Number(b.dataset.drop), 1); saveEdits(); }));
    document.getElementById("run-edits").hidden = !edits.length;
    document.getElementById("clear-edits").hidden = !edits.length;
  }
  function addEdit(id, mode, value) {
    const v = Number(value);
    if (value === "" || !Number.isFinite(v)) return;
    edits = edits.filter(e => e.split(":")[0] !== id).concat([`${id}:${mode}:${v}`]);
    saveEdits();
  }
  if (editList) {
    document.getElementById("run-edits").addEventListener("click", () => window.location.assign(url.toString()));
    document.getElementById("clear-edits").addEventListener("click", () => { edits = []; saveEdits(); });
    saveEdits();
  }

  function select(id) {
    url.searchParams.set("selected", id);
    save();
    card(id);
  }

  function togglePin(id) {
    pinned = pinned.includes(id) ? pinned.filter(p => p !== id) : pinned.concat([id]);
    save();
    renderSide();
  }

  svg.addEventListener("click", e => {
    const g = e.target.closest("g.node");
    if (!g) return;
    if (e.shiftKey) togglePin(g.dataset.id); else select(g.dataset.id);
  });
  svg.addEventListener("keydown", e => {
    const g = e.target.closest("g.node");
    if (g && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); select(g.dataset.id); }
  });
  document.getElementById("group-btn").addEventListener("click", () => {
    if (pinned.length < 2) return;
    const label = (window.prompt("supernode label", "supernode " + (groups.length + 1)) || "").replace(/[;:,]/g, " ").trim();
    if (!label) return;
    groups.push({ label, members: pinned.slice() });
    pinned = [];
    save();
    renderSide();
  });
  renderSide();
  const sel = url.searchParams.get("selected");
  if (sel && byId.has(sel)) card(sel);
})();
