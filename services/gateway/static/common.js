"use strict";
// Helpers every page uses: the session's CSRF token, form posts, HTML fragments, the live stream.
window.AT = (() => {
  const csrf = () => (document.querySelector('meta[name="csrf"]') || {}).content || "";
  async function post(url, data) {
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin", body: new URLSearchParams(data || {}),
      headers: {"X-CSRF-Token": csrf(), "Content-Type": "application/x-www-form-urlencoded"},
    });
    let json = null;
    try { json = await r.clone().json(); } catch (e) { json = null; }
    return {ok: r.ok, status: r.status, json};
  }
  async function html(url) {
    const r = await fetch(url, {credentials: "same-origin"});
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    return r.text();
  }
  // Server-Sent Events from /ui/stream; handlers by event name ("queue", "episode").
  function stream(params, handlers) {
    const es = new EventSource("/ui/stream?" + params);
    for (const [name, fn] of Object.entries(handlers)) {
      es.addEventListener(name, (e) => fn(JSON.parse(e.data), e.lastEventId || ""));
    }
    es.addEventListener("open", () => document.body.classList.add("connected"));
    es.addEventListener("error", () => document.body.classList.remove("connected"));
    return es;
  }
  function debounce(fn, ms) {
    let t = null;
    return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
  }
  // For a page that is closing: fetch may not finish, a beacon does (form-encoded, CSRF in the body).
  function beacon(url, data) {
    const body = new URLSearchParams({...data, csrf: csrf()}).toString();
    return navigator.sendBeacon(url, new Blob([body], {type: "application/x-www-form-urlencoded"}));
  }
  // Stream positions "ms-seq": is a after b?
  function after(a, b) {
    const [am, as] = a.split("-").map(Number), [bm, bs] = (b || "0-0").split("-").map(Number);
    return am > bm || (am === bm && (as || 0) > (bs || 0));
  }
  function typing(e) {
    const t = e.target;
    return t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT" || t.tagName === "SELECT" || t.isContentEditable);
  }
  return {csrf, post, html, stream, debounce, beacon, after, typing};
})();
