// The attribution graph page: node cards, pinning, supernodes; all state in the URL (reload = same view).
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
    const box = document.getElementById("node-card");
    box.innerHTML = html;
    box.querySelectorAll("a[data-goto]").forEach(a => a.addEventListener("click", e => { e.preventDefault(); select(a.dataset.goto); }));
    document.getElementById("pin-btn").addEventListener("click", () => { togglePin(id); card(id); });
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
