"use strict";
// The plan editor: edit the steps, see the diff against the proposal, approve.
document.addEventListener("DOMContentLoaded", () => {
  const root = document.querySelector(".plan-page");
  const planId = root.dataset.plan;
  const endpoints = JSON.parse(document.getElementById("endpoints").textContent);
  let steps = JSON.parse(document.getElementById("current").textContent).steps.map((s) => ({...s}));
  const list = document.getElementById("steps");
  const approved = root.dataset.status === "approved";

  const clean = () => steps.map((s) => s.kind === "fork"
    ? {kind: "fork", fork_id: Number(s.fork_id), query: s.query || "", endpoint: s.endpoint || null, budget: s.budget ? Number(s.budget) : null}
    : {kind: "join", fork_id: Number(s.fork_id)});
  const json = () => JSON.stringify({steps: clean()});
  const diff = AT.debounce(async () => {
    const form = document.getElementById("approve-form");
    const r = await fetch(`/ui/plans/${planId}/diff`, {
      method: "POST", credentials: "same-origin",
      headers: {"X-CSRF-Token": AT.csrf(), "Content-Type": "application/x-www-form-urlencoded"},
      body: new URLSearchParams({plan: json(), organizer_budget: form.organizer_budget.value, worker_budget: form.worker_budget.value}),
    });
    document.getElementById("diff").innerHTML = r.ok ? await r.text() : `<p class="error">${r.status}</p>`;
  }, 150);
  const forkIds = () => steps.filter((s) => s.kind === "fork").map((s) => Number(s.fork_id));

  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    Object.assign(e, props || {});
    for (const k of kids) e.append(k);
    return e;
  }
  function render() {
    list.innerHTML = "";
    steps.forEach((s, i) => {
      const li = el("li", {className: `step s-${s.kind}`});
      li.dataset.kind = s.kind; li.dataset.fork = s.fork_id;
      if (s.kind === "fork") {
        li.append(el("span", {className: "tag", textContent: `fork ${s.fork_id}`}));
        const q = el("input", {className: "q", value: s.query || "", size: 26, placeholder: "sub-query"});
        q.addEventListener("input", () => { s.query = q.value; diff(); });
        const ep = el("select", {className: "ep"});
        for (const name of ["", ...endpoints]) ep.append(el("option", {value: name, textContent: name || "model", selected: (s.endpoint || "") === name}));
        ep.addEventListener("change", () => { s.endpoint = ep.value || null; diff(); });
        const b = el("input", {className: "budget", value: s.budget || "", size: 5, placeholder: "budget"});
        b.addEventListener("input", () => { s.budget = b.value ? Number(b.value) : null; diff(); });
        li.append(q, " → ", ep, " ", b);
      } else {
        li.append(el("span", {className: "tag", textContent: "join"}));
        const sel = el("select", {className: "join"});
        for (const id of forkIds()) sel.append(el("option", {value: id, textContent: `fork ${id}`, selected: id === Number(s.fork_id)}));
        sel.addEventListener("change", () => { s.fork_id = Number(sel.value); li.dataset.fork = s.fork_id; diff(); });
        li.append(sel);
      }
      const up = el("button", {type: "button", className: "up", textContent: "↑", title: "move up"});
      const down = el("button", {type: "button", className: "down", textContent: "↓", title: "move down"});
      const del = el("button", {type: "button", className: "del", textContent: "✕", title: "remove"});
      up.addEventListener("click", () => { if (i > 0) { [steps[i - 1], steps[i]] = [steps[i], steps[i - 1]]; render(); diff(); } });
      down.addEventListener("click", () => { if (i < steps.length - 1) { [steps[i + 1], steps[i]] = [steps[i], steps[i + 1]]; render(); diff(); } });
      del.addEventListener("click", () => { steps.splice(i, 1); render(); diff(); });
      li.append(" ", up, down, del);
      if (approved) for (const c of li.querySelectorAll("input, select, button")) c.disabled = true;
      list.append(li);
    });
  }
  document.getElementById("add-fork").addEventListener("click", () => {
    const id = Math.max(0, ...forkIds()) + 1;
    steps.push({kind: "fork", fork_id: id, query: "", endpoint: null, budget: null});
    render(); diff();
    const qs = list.querySelectorAll("input.q"); qs[qs.length - 1].focus();
  });
  document.getElementById("add-join").addEventListener("click", () => {
    const joined = new Set(steps.filter((s) => s.kind === "join").map((s) => Number(s.fork_id)));
    const id = forkIds().find((f) => !joined.has(f)) || forkIds()[0] || 1;
    steps.push({kind: "join", fork_id: id});
    render(); diff();
  });
  document.getElementById("approve-form").addEventListener("submit", () => {
    document.getElementById("plan-json").value = json();
  });
  for (const name of ["organizer_budget", "worker_budget"]) document.getElementById("approve-form")[name].addEventListener("input", diff);
  if (approved) for (const b of document.querySelectorAll("#add-fork, #add-join")) b.disabled = true;
  render();
});
