// The qwenlm chat page. It talks to the server's own /v1 API. Model text is only ever put
// into the page through textContent and createElement: no innerHTML, so a reply can never
// run HTML or script (and the page's Content-Security-Policy forbids inline script anyway).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], controller: null };

// -- markdown to DOM ------------------------------------------------------------------------
const KEYWORDS = new Set(("def class return if elif else for while in not and or import from as with " +
  "try except finally raise lambda yield pass break continue None True False function const let var " +
  "new this async await public private static void int float double char bool struct fn impl pub use " +
  "mut match enum interface extends package func go defer select case switch default do typeof " +
  "null true false nil self print").split(" "));
const TOKEN = /(\/\/[^\n]*|#[^\n]*|\/\*[\s\S]*?\*\/)|("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`)|(\b\d[\d_]*(?:\.\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)/g;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function highlight(code, target) {
  let last = 0;
  for (const m of code.matchAll(TOKEN)) {
    const cls = m[1] ? "tok-com" : m[2] ? "tok-str" : m[3] ? "tok-num" : KEYWORDS.has(m[4]) ? "tok-kw" : null;
    if (!cls) continue;
    if (m.index > last) target.appendChild(document.createTextNode(code.slice(last, m.index)));
    target.appendChild(el("span", cls, m[0]));
    last = m.index + m[0].length;
  }
  if (last < code.length) target.appendChild(document.createTextNode(code.slice(last)));
}

function copyButton(getText) {
  const b = el("button", "copy", "Copy");
  b.type = "button";
  b.addEventListener("click", async () => {
    const text = getText();
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const ta = el("textarea");
      ta.value = text;
      document.body.appendChild(ta);
      ta.select();
      document.execCommand("copy");
      ta.remove();
    }
    b.textContent = "Copied";
    setTimeout(() => { b.textContent = "Copy"; }, 1200);
  });
  return b;
}

function inline(text, target) {
  const re = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*)/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index > last) target.appendChild(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) target.appendChild(el("code", null, m[1].slice(1, -1)));
    else if (m[2]) target.appendChild(el("strong", null, m[2].slice(2, -2)));
    else target.appendChild(el("em", null, m[3].slice(1, -1)));
    last = m.index + m[0].length;
  }
  if (last < text.length) target.appendChild(document.createTextNode(text.slice(last)));
}

function renderMarkdown(text) {
  const root = el("div", "body");
  const lines = text.split("\n");
  let para = [];
  let list = null;
  const flush = () => {
    if (para.length) {
      const p = el("p");
      inline(para.join("\n"), p);
      root.appendChild(p);
      para = [];
    }
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+#.-]*)/);
    if (fence) {
      flush();
      const body = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i++]);
      const code = body.join("\n");
      const pre = el("pre");
      const c = el("code");
      if (fence[1]) c.dataset.lang = fence[1];
      highlight(code, c);
      pre.appendChild(c);
      pre.appendChild(copyButton(() => code));
      root.appendChild(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/);
    if (heading) {
      flush();
      const h = el("h" + Math.min(heading[1].length + 2, 6));
      inline(heading[2], h);
      root.appendChild(h);
    } else if (item) {
      if (para.length) flush();
      const kind = item[1] ? "ol" : "ul";
      if (!list || list.tagName.toLowerCase() !== kind) {
        list = el(kind);
        root.appendChild(list);
      }
      const li = el("li");
      inline(item[2], li);
      list.appendChild(li);
    } else if (!line.trim()) {
      flush();
    } else {
      list = null;
      para.push(line);
    }
  }
  flush();
  return root;
}
window.qwenlmRenderMarkdown = renderMarkdown;

// -- conversation ---------------------------------------------------------------------------
function addMessage(role, text) {
  const box = el("div", "msg " + role);
  box.appendChild(el("div", "role", role === "user" ? "You" : role === "error" ? "Error" : "Assistant"));
  const body = role === "assistant" ? renderMarkdown(text) : el("div", "body user-text", text);
  box.appendChild(body);
  const holder = { box, text };
  if (role !== "error") box.appendChild(copyButton(() => holder.text));
  $("messages").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return holder;
}

function setText(holder, text) {
  holder.text = text;
  const fresh = renderMarkdown(text);
  holder.box.replaceChild(fresh, holder.box.querySelector(".body"));
  $("messages").scrollTop = $("messages").scrollHeight;
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("input").disabled = on;
}

function options() {
  const num = (id) => {
    const v = $(id).value.trim();
    return v === "" ? undefined : Number(v);
  };
  const body = { temperature: num("temperature"), top_p: num("top-p"), max_tokens: num("max-tokens"), seed: num("seed") };
  for (const k of Object.keys(body)) if (body[k] === undefined || Number.isNaN(body[k])) delete body[k];
  return body;
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.box.classList.add("streaming");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.messages] : state.messages;
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  let content = "";
  let pending = false;
  const paint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; setText(reply, content); });
  };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, messages, stream: true, ...options() }),
      signal: controller.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${res.status}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let at;
      while ((at = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, at);
        buf = buf.slice(at + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
          if (delta && delta.content) {
            content += delta.content;
            paint();
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") addMessage("error", String(e.message || e));
  } finally {
    state.controller = null;
    setText(reply, content);
    reply.box.classList.remove("streaming");
    reply.box.dataset.done = controller.signal.aborted ? "stopped" : "finished";
    if (content) state.messages.push({ role: "assistant", content });
    busy(false);
    $("input").focus();
  }
}

async function init() {
  try {
    const res = await fetch("/v1/models");
    const data = await res.json();
    state.model = data.data[0].id;
    $("model-name").textContent = state.model;
  } catch {
    $("model-name").textContent = "(could not reach the server)";
  }
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    $("messages").replaceChildren();
  });
  $("toggle-settings").addEventListener("click", () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!s.hidden));
  });
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", init);
