"use strict";
// The human organizer: what you write goes to the episode's organizer; its text, the workers' tokens and
// results come back over the live stream.
document.addEventListener("DOMContentLoaded", () => {
  const root = document.querySelector(".organize");
  const eid = root.dataset.episode;
  const capacity = Number(root.dataset.capacity);
  const transcript = document.getElementById("transcript");
  const workers = document.getElementById("workers");
  const joinSel = document.getElementById("join-id");
  const err = document.getElementById("composer-error");
  let pos = root.dataset.after;
  let nextFork = 1;
  const open = new Set();

  for (const w of workers.querySelectorAll("[data-fork]")) {
    const id = Number(w.dataset.fork);
    nextFork = Math.max(nextFork, id + 1);
    if (w.dataset.state !== "joined") open.add(id);
  }
  function joins() {
    joinSel.innerHTML = "";
    for (const id of [...open].sort((a, b) => a - b)) {
      const o = document.createElement("option"); o.value = id; o.textContent = `fork ${id}`; joinSel.append(o);
    }
    document.getElementById("join").disabled = open.size === 0;
    document.getElementById("fork").disabled = open.size >= capacity - 1;
  }
  function show(msg) { err.hidden = !msg; err.textContent = msg || ""; }
  async function send(text) {
    if (!text) return false;
    const r = await AT.post(`/ui/organize/${eid}/write`, {text});
    if (!r.ok) { show(r.json ? r.json.detail : `not sent (${r.status})`); return false; }
    show("");
    return true;
  }
  function panel(agent, forkId, query, endpoint) {
    let w = workers.querySelector(`[data-agent="${agent}"]`);
    if (w) return w;
    w = document.createElement("div");
    const kind = (endpoint || "").split(":")[0] === "human" ? "human" : endpoint ? "tool" : "model";
    w.className = `sibling k-${kind}`;
    w.dataset.agent = agent; w.dataset.fork = forkId; w.dataset.state = "running";
    w.innerHTML = '<div class="sib-head"><b></b> <span class="ep"></span> <span class="sib-state">running</span></div>' +
      '<div class="query"></div><pre class="stream tokens"></pre><div class="returned" hidden><span class="label">returned</span> <span class="value"></span></div>';
    w.querySelector("b").textContent = agent;
    w.querySelector(".ep").textContent = "@" + (endpoint || "model");
    w.querySelector(".query").textContent = query;
    w.querySelector("pre").dataset.text = `${eid}/${agent}`;
    workers.append(w);
    return w;
  }
  function state(w, s) { w.dataset.state = s; w.querySelector(".sib-state").textContent = s; w.classList.toggle("joined", s === "joined"); }
  function finish(status, answer) {
    root.dataset.status = status;
    const st = document.getElementById("ep-status");
    st.textContent = status; st.className = `status s-${status}`;
    for (const b of document.querySelectorAll("#composer button, #composer textarea, #composer input, #composer select")) b.disabled = true;
    if (answer != null) { const a = document.getElementById("answer-box"); a.hidden = false; a.textContent = "Answer: " + answer; }
  }

  document.getElementById("send-thought").addEventListener("click", async () => {
    const box = document.getElementById("thought"), text = box.value;
    if (await send(text) && box.value === text) box.value = "";
  });
  const fork = async () => {
    const q = document.getElementById("fork-query");
    const ep = document.getElementById("fork-endpoint").value;
    if (!q.value.trim()) { show("write the sub-query first"); return; }
    if (open.size >= capacity - 1) { show(`capacity ${capacity}: join a worker before forking another`); return; }
    const id = nextFork, query = q.value;
    nextFork = id + 1;
    if (await send(`<FORK-${id}${ep ? "@" + ep : ""}>${query.trim()}</FORK-${id}>`)) {
      open.add(id); joins();
      if (q.value === query) q.value = "";
    } else {
      nextFork = id;
    }
  };
  const join = async () => {
    const id = Number(joinSel.value);
    if (!id) return;
    if (await send(`<JOIN-${id}>`)) { open.delete(id); joins(); }
  };
  const answer = async () => {
    const a = document.getElementById("answer");
    if (!a.value.trim()) { show("write the answer first"); return; }
    await send(`<ANSWER>${a.value.trim()}</ANSWER>`);
  };
  document.getElementById("fork").addEventListener("click", fork);
  document.getElementById("join").addEventListener("click", join);
  document.getElementById("send-answer").addEventListener("click", answer);
  document.getElementById("give-up").addEventListener("click", () => AT.post(`/ui/organize/${eid}/give-up`));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && e.target.id === "thought") { e.preventDefault(); document.getElementById("send-thought").click(); }
    if (e.altKey && e.key.toLowerCase() === "f") { e.preventDefault(); fork(); }
    if (e.altKey && e.key.toLowerCase() === "j") { e.preventDefault(); join(); }
    if (e.altKey && e.key.toLowerCase() === "a") { e.preventDefault(); answer(); }
  });

  joins();
  if (["pending", "running"].includes(root.dataset.status)) {
    const es = AT.stream(`follow=${eid}:${pos}`, {
      episode: (ev, id) => {
        const p = id.split(/:(.*)/s)[1];
        if (pos && !AT.after(p, pos)) return;
        pos = p;
        const d = ev.data;
        if (ev.kind === "text") {
          const el = ev.agent === "organizer" ? transcript : workers.querySelector(`[data-text="${eid}/${ev.agent}"]`);
          if (el) { el.textContent += d.text; el.scrollTop = el.scrollHeight; }
        } else if (ev.kind === "fork") {
          const agent = ev.agent === "organizer" ? String(d.fork_id) : `${ev.agent}.${d.fork_id}`;
          panel(agent, d.fork_id, d.query, d.endpoint);
          if (ev.agent === "organizer") { open.add(d.fork_id); nextFork = Math.max(nextFork, d.fork_id + 1); joins(); }
        } else if (ev.kind === "segment") {
          const s = d.segment, w = workers.querySelector(`[data-agent="${s.agent}"]`);
          if (w) {
            if (w.dataset.state !== "joined") state(w, "returned");
            const r = w.querySelector(".returned"); r.hidden = false; r.querySelector(".value").textContent = s.returned ?? s.error ?? "";
          }
        } else if (ev.kind === "worker_result" && ev.agent === "organizer") {
          const w = workers.querySelector(`[data-agent="${d.fork_id}"]`);
          if (w) state(w, "joined");
          open.delete(d.fork_id); joins();
        } else if (ev.kind === "finished") {
          finish(d.status, d.answer);
          es.close();
        } else if (ev.kind === "format_error") {
          show(`format error: ${d.message}`);
        }
      },
    });
  } else {
    finish(root.dataset.status, null);
  }
});
