"use strict";
// An episode's timeline, redrawn as its events arrive while it runs.
document.addEventListener("DOMContentLoaded", () => {
  const root = document.querySelector(".episode-page");
  const eid = root.dataset.episode;
  if (!["pending", "running"].includes(root.dataset.status)) return;
  let busy = false, again = false;
  async function redraw() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      for (const view of ["tokens", "wall"]) {
        document.getElementById(`tl-${view}`).innerHTML = await AT.html(`/ui/episodes/${eid}/timeline?view=${view}`);
      }
    } finally {
      busy = false;
      if (again) { again = false; setTimeout(redraw, 250); }
    }
  }
  const soon = AT.debounce(redraw, 200);
  const es = AT.stream(`follow=${eid}:0`, {
    episode: (ev) => {
      soon();
      if (ev.kind === "finished") {
        es.close();
        const st = document.getElementById("ep-status");
        st.textContent = ev.data.status; st.className = `status s-${ev.data.status}`;
        setTimeout(() => location.reload(), 600);  // the stored episode: exact timeline, metrics, plan check
      }
    },
  });
  setInterval(() => { if (["pending", "running"].includes(root.dataset.status)) soon(); }, 2000);  // wall time moves on
});
