// saescope: the little JS there is. htmx does the partial updates; this keeps the focused token's value
// announced to screen readers (aria-live) as well as shown in its tooltip.
// A token's tooltip opens towards the side with more room, so one at the right edge adds no horizontal scroll.
const placeTip = (e) => {
  const t = e.target.closest && e.target.closest(".tok");
  if (!t) return;
  const r = t.getBoundingClientRect();
  t.classList.toggle("tip-end", r.left + r.width / 2 > document.documentElement.clientWidth / 2);
};
document.addEventListener("mouseover", placeTip);
document.addEventListener("focusin", placeTip);

document.addEventListener("focusin", (e) => {
  const t = e.target.closest && e.target.closest(".tok.on");
  const live = document.getElementById("tok-live");
  if (t && live) live.textContent = t.dataset.tip;
});

// ← and → step to the previous and next feature on a feature page (not while typing).
document.addEventListener("keydown", (e) => {
  if (e.altKey || e.ctrlKey || e.metaKey || e.target.closest("input, textarea, select")) return;
  const rel = { ArrowLeft: "prev", ArrowRight: "next" }[e.key];
  const link = rel && document.querySelector(`.step a[rel=${rel}]`);
  if (link) link.click();
});

// Feature lists live in their URL. "+ list" appends the feature to the list you are building (remembered in this
// browser only as that URL) and the header links to it; without JS the link opens a new list of one feature.
(() => {
  const KEY = "saescope-list";
  const mine = document.getElementById("my-list");
  const show = () => {
    const url = localStorage.getItem(KEY);
    if (!mine || !url) return;
    const n = new URL(url, location.href).searchParams.getAll("f").length;
    mine.href = url; mine.textContent = `list (${n})`; mine.hidden = false;
  };
  document.addEventListener("click", (e) => {
    const a = e.target.closest && e.target.closest("a.add-to-list");
    if (!a) return;
    e.preventDefault();
    const stored = localStorage.getItem(KEY);
    const url = new URL(stored || `/sae/${a.dataset.sae}/list`, location.href);
    if (!url.pathname.startsWith(`/sae/${a.dataset.sae}/`)) url.href = new URL(`/sae/${a.dataset.sae}/list`, location.href).href;
    if (!url.searchParams.getAll("f").includes(a.dataset.feature)) {
      url.searchParams.append("f", a.dataset.feature); url.searchParams.append("note", "");
    }
    localStorage.setItem(KEY, url.pathname + url.search);
    a.textContent = "✓ in list"; show();
  });
  if (location.pathname.endsWith("/list")) localStorage.setItem(KEY, location.pathname + location.search);
  show();
})();

// Inspect: the token whose features are shown is marked (its detail loads through htmx without a page load).
document.addEventListener("focusin", (e) => {
  const t = e.target.closest && e.target.closest(".inspect-tokens .tok");
  if (!t) return;
  for (const o of t.parentElement.querySelectorAll(".tok.selected")) { o.classList.remove("selected"); o.removeAttribute("aria-current"); }
  t.classList.add("selected"); t.setAttribute("aria-current", "true");
  const form = document.getElementById("color-by");  // colouring by a feature keeps the chosen position
  if (!form) return;
  let p = form.querySelector("input[name=pos]");
  if (!p) { p = document.createElement("input"); p.type = "hidden"; p.name = "pos"; form.append(p); }
  p.value = t.dataset.pos;
});

// Inspect: tokens selected for the search across every SAE (the sel= URL parameter): click selects one, shift-click
// a range from the last one clicked, ctrl/cmd-click adds or removes one; Enter on a focused token does the same.
// The selection is chosen on mousedown, before the focus loads the token's detail, so that request carries it.
(() => {
  let anchor = null;
  const strip = () => document.getElementById("inspect-strip");
  const picked = () => [...strip().querySelectorAll(".tok.picked")].map((t) => Number(t.dataset.pos));
  const apply = (sel, pos) => {
    for (const t of strip().querySelectorAll(".tok")) t.classList.toggle("picked", sel.includes(Number(t.dataset.pos)));
    const form = document.getElementById("search-all-form");
    if (!form) return;
    form.querySelector("input[name=sel]").value = sel.join(",");
    let p = form.querySelector("input[name=pos]");
    if (!p) { p = document.createElement("input"); p.type = "hidden"; p.name = "pos"; form.append(p); }
    p.value = pos;
    htmx.trigger(form, "submit");
  };
  const choose = (t, e) => {
    const p = Number(t.dataset.pos);
    let sel = picked();
    if (e.shiftKey && anchor !== null) {
      sel = [];
      for (let i = Math.min(anchor, p); i <= Math.max(anchor, p); i++) sel.push(i);
    } else if (e.ctrlKey || e.metaKey) {
      sel = sel.includes(p) ? sel.filter((x) => x !== p) : [...sel, p].sort((x, y) => x - y);
      anchor = p;
    } else { sel = [p]; anchor = p; }
    apply(sel, p);
  };
  document.addEventListener("mousedown", (e) => {
    const t = e.target.closest && e.target.closest("#inspect-strip .tok");
    if (!t || e.button !== 0) return;
    if (e.shiftKey) { e.preventDefault(); choose(t, e); t.focus(); return; }  // no text selection
    choose(t, e);
  });
  document.addEventListener("keydown", (e) => {
    const t = e.key === "Enter" && e.target.closest && e.target.closest("#inspect-strip .tok");
    if (t) { e.preventDefault(); choose(t, e); }
  });
  document.addEventListener("htmx:configRequest", (e) => {  // a token's detail keeps the selection in its URL
    if (!(e.detail.elt.closest && e.detail.elt.closest("#inspect-strip"))) return;
    const sel = picked();
    if (sel.length) e.detail.parameters.sel = sel.join(",");
  });
})();

// Steering: each edit is a row (feature, mode, value, :unit, the feature's top tokens) that writes the same
// edit=FEATURE:MODE:VALUE[:unit] URL parameter the raw box did, so links stay shareable; "+ edit" adds a row.
// A row the server read from the URL (app/web/edits.py edit_fields) keeps its edit exactly as given until it is
// changed; one it could not read (data-raw-only) stays the raw box, so nothing of a link is lost. Without JS the
// raw boxes stay.
(() => {
  const rows = document.getElementById("edit-rows");
  if (!rows) return;
  const sae = rows.dataset.sae, max = Number(rows.dataset.max || 16), add = document.getElementById("add-edit");
  const STEERING = ["add", "orthogonal", "cap"];  // the modes :unit applies to (app/web/edits.py STEERING)
  const q = (row, sel) => row.querySelector(sel);
  const state = (row) => {  // which fields apply to the chosen mode
    const mode = q(row, ".e-mode").value;
    q(row, ".e-value").disabled = mode === "ablate";
    q(row, ".e-unit").disabled = !STEERING.includes(mode);
    const raw = q(row, ".e-raw");
    raw.disabled = raw.value.trim() === "";  // an empty row adds nothing to the URL
  };
  const sync = (row) => {
    const f = q(row, ".e-feature").value.trim(), mode = q(row, ".e-mode").value, v = q(row, ".e-value").value.trim();
    const unit = q(row, ".e-unit").checked && STEERING.includes(mode) ? ":unit" : "";
    q(row, ".e-raw").value = f === "" ? "" : mode === "ablate" ? `${f}:ablate` : `${f}:${mode}:${v === "" ? 0 : v}${unit}`;
    state(row);
  };
  const chips = (row) => {
    const f = q(row, ".e-feature").value.trim(), box = q(row, ".e-chips");
    if (!/^\d{1,9}$/.test(f)) { box.textContent = ""; return; }
    fetch(`/sae/${encodeURIComponent(sae)}/feature/${f}/chips`)
      .then((r) => (r.ok ? r.text() : "")).then((html) => { box.innerHTML = html; })  // escaped by the server
      .catch(() => { box.textContent = ""; });
  };
  const enhance = (row) => {
    if (row.hasAttribute("data-raw-only")) return;
    q(row, ".e-raw").type = "hidden"; q(row, ".e-structured").hidden = false; state(row);
  };
  const all = () => rows.querySelectorAll(".edit-row");
  all().forEach(enhance);
  add.hidden = false;
  rows.addEventListener("input", (e) => {
    const r = e.target.closest(".edit-row");
    if (r && !e.target.matches(".e-raw")) sync(r);
  });
  rows.addEventListener("change", (e) => {
    const r = e.target.closest(".edit-row");
    if (!r || e.target.matches(".e-raw")) return;
    sync(r);
    if (e.target.matches(".e-feature")) chips(r);
  });
  rows.addEventListener("click", (e) => {
    const x = e.target.closest(".e-remove");
    if (!x) return;
    const r = x.closest(".edit-row");
    if (all().length > 1) r.remove();
    else {
      q(r, ".e-feature").value = ""; q(r, ".e-value").value = ""; q(r, ".e-unit").checked = false;
      q(r, ".e-chips").textContent = ""; sync(r);
    }
    add.disabled = all().length >= max;
  });
  add.addEventListener("click", () => {
    const list = all();
    if (list.length >= max) return;
    const r = list[list.length - 1].cloneNode(true);
    r.removeAttribute("data-raw-only"); q(r, ".e-mode").removeAttribute("id");  // ids stay unique
    q(r, ".e-feature").value = ""; q(r, ".e-value").value = ""; q(r, ".e-mode").value = "add";
    q(r, ".e-unit").checked = false; q(r, ".e-chips").textContent = "";
    list[list.length - 1].after(r); enhance(r); sync(r); q(r, ".e-feature").focus();
    add.disabled = all().length >= max;
  });
})();
