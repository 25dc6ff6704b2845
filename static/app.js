// saescope: the little JS there is. htmx does the partial updates; this keeps the focused token's value
// announced to screen readers (aria-live) as well as shown in its tooltip.
document.addEventListener("focusin", (e) => {
  const t = e.target.closest && e.target.closest(".tok.on");
  const live = document.getElementById("tok-live");
  if (t && live) live.textContent = t.dataset.tip;
});
