"use strict";
// The inbox: keyboard-first (j/k select, c claim, n next, s skip, Ctrl+Enter submit, u undo), one live
// stream for the queue and the episodes shown, a claim renewed while this page is open.
document.addEventListener("DOMContentLoaded", () => {
  const root = document.querySelector(".inbox");
  const list = document.getElementById("inbox-list");
  const bench = document.getElementById("workbench");
  const lease = Number(root.dataset.lease) * 1000;
  let held = root.dataset.held || null;
  let selected = root.dataset.selected || null;
  let renewTimer = null, undoTimer = null, es = null, follow = "";
  const positions = {};

  const tasks = () => [...list.querySelectorAll(".task[data-task]")];
  function flash(msg) {
    let el = document.getElementById("flash");
    if (!el) { el = document.createElement("p"); el.id = "flash"; el.className = "error"; el.setAttribute("role", "alert"); bench.prepend(el); }
    el.textContent = msg;
  }
  function mark() {
    for (const t of tasks()) t.classList.toggle("selected", t.dataset.task === selected);
  }
  function select(delta) {
    const all = tasks();
    if (!all.length) return;
    let i = all.findIndex((t) => t.dataset.task === selected);
    i = i < 0 ? 0 : Math.max(0, Math.min(all.length - 1, i + delta));
    selected = all[i].dataset.task;
    mark();
    all[i].scrollIntoView({block: "nearest"});
  }
  const refresh = AT.debounce(async () => {
    list.innerHTML = await AT.html("/ui/inbox/list");
    mark();
    connect();
  }, 120);

  function stopRenew() { clearInterval(renewTimer); renewTimer = null; }
  async function renew() {
    if (!held || !renewTimer) return;
    const box = document.getElementById("answer");
    const r = await AT.post(`/ui/tasks/${held}/renew`, box ? {draft: box.value} : {});
    if (!r.ok) { stopRenew(); flash(r.json ? r.json.detail : "your claim lapsed"); held = null; refresh(); }
  }
  const saveDraft = AT.debounce(renew, 400);  // the partial answer is kept as it is typed
  function startRenew() {
    stopRenew();
    renewTimer = setInterval(renew, Math.max(1000, lease / 3));
  }
  async function openBench(id) {
    bench.innerHTML = await AT.html(`/ui/tasks/${id}/work`);
    const b = bench.querySelector(".bench");
    clearInterval(undoTimer);
    if (b.dataset.state === "yours") {
      held = id; startRenew();
      const box = document.getElementById("answer");
      box.addEventListener("input", saveDraft);
      box.focus();
      document.getElementById("submit").addEventListener("click", submit);
      document.getElementById("skip").addEventListener("click", skip);
    } else if (b.dataset.state === "submitted") {
      held = id; stopRenew();
      document.getElementById("undo").addEventListener("click", undo);
      let left = Number(b.dataset.undoLeft || 0);
      const out = document.getElementById("undo-left");
      const tick = () => { out.textContent = left > 0 ? `${Math.ceil(left)} s to take it back` : "the join takes it now"; left -= 0.25; };
      tick(); undoTimer = setInterval(tick, 250);
    } else {
      held = null; stopRenew();
    }
  }
  async function claim(id) {
    if (!id) return;
    const r = await AT.post(`/ui/tasks/${id}/claim`);
    if (!r.ok) { flash(r.json ? r.json.detail : `claim failed (${r.status})`); refresh(); return; }
    selected = id;
    await openBench(id);
    refresh();
  }
  async function submit() {
    const box = document.getElementById("answer");
    if (!held || !box || !box.value.trim()) return;
    const btn = document.getElementById("submit");
    btn.disabled = true;
    const r = await AT.post(`/ui/tasks/${held}/submit`, {answer: box.value});
    if (!r.ok) { btn.disabled = false; flash(r.json ? r.json.detail : `submit failed (${r.status})`); return; }
    await openBench(held);
  }
  async function undo() {
    if (!held) return;
    const r = await AT.post(`/ui/tasks/${held}/undo`);
    if (!r.ok) { flash(r.json ? r.json.detail : "too late"); return; }
    await openBench(held);
  }
  async function skip() {
    const id = held;
    if (id) {
      const box = document.getElementById("answer");
      await AT.post(`/ui/tasks/${id}/release`, {reason: "skipped", draft: box ? box.value : ""});
      held = null; stopRenew();
      bench.innerHTML = '<p class="muted">Skipped.</p>';
    }
    await next(id);
  }
  async function next(skipId) {
    const open = tasks().filter((t) => t.dataset.state === "open" && t.dataset.task !== skipId);
    if (open.length) await claim(open[0].dataset.task);
  }

  list.addEventListener("click", (e) => {
    const btn = e.target.closest("button.claim");
    if (btn) { claim(btn.dataset.task); return; }
    const t = e.target.closest(".task[data-task]");
    if (t) { selected = t.dataset.task; mark(); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); return; }
    if (e.key === "Escape") { document.activeElement.blur(); return; }
    if (AT.typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    const keys = {j: () => select(1), k: () => select(-1), c: () => claim(selected), Enter: () => claim(selected),
                  n: () => next(held), s: () => skip(), u: () => undo()};
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
  });
  window.addEventListener("pagehide", () => {
    if (!held || !renewTimer) return;
    const box = document.getElementById("answer");
    AT.beacon(`/ui/tasks/${held}/release`, {reason: "page closed", draft: box ? box.value : ""});
  });

  function connect() {
    const pairs = ((list.querySelector(".inbox-list") || {}).dataset || {}).follow || "";
    for (const pair of pairs.split(" ").filter(Boolean)) {
      const [eid, pos] = pair.split(":");
      positions[eid] = pos;
    }
    const episodes = pairs.split(" ").filter(Boolean).map((p) => p.split(":")[0]).sort().join(" ");
    if (es && episodes === follow) return;  // same episodes: the open stream goes on
    follow = episodes;
    if (es) es.close();
    const params = new URLSearchParams({queue: "1"});
    for (const pair of pairs.split(" ").filter(Boolean)) params.append("follow", pair);
    es = AT.stream(params.toString(), {
      queue: (n) => {
        refresh();
        if (held && n.task_id === held && ["consumed", "deadline", "fallback", "cancelled", "lease_expired"].includes(n.action)) openBench(held);
      },
      episode: (ev, id) => {
        const [eid, pos] = id.split(/:(.*)/s);
        if (positions[eid] && !AT.after(pos, positions[eid])) return;
        positions[eid] = pos;
        if (ev.kind === "text") {
          const el = list.querySelector(`[data-text="${eid}/${ev.agent}"]`);
          if (el) { el.textContent += ev.data.text; el.scrollTop = el.scrollHeight; }
        } else {
          refresh();
        }
      },
    });
  }
  mark();
  connect();
  if (held) openBench(held);
});
