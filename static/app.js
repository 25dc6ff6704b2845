// saescope: the little JS there is. htmx does the partial updates; this keeps the focused token's value
// announced to screen readers (aria-live) as well as shown in its tooltip.
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
