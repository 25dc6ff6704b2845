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
