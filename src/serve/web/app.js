// The chat page of `arcana-serve web`. The conversation lives here and is sent whole with each
// request, so the server keeps no per-client state; answers stream back as JSON lines.
"use strict";

const $ = (id) => document.getElementById(id);
const CURSOR = "\u258c";
const MODEL_RETRY_MS = 5000;

let conversation = null; // {image, mode, template, exchanges: [[user, reply]], failed}
let pendingImage = null; // data URL waiting in the upload box; it starts a new conversation when sent
let generating = false;

// A server started with --api-key wants it with every API call: taken from `?key=` once, then kept in
// this browser; asked for when the server refuses the one it has.
const KEY_STORE = "arcana-api-key";
{
  const fromUrl = new URLSearchParams(location.search).get("key");
  if (fromUrl) {
    localStorage.setItem(KEY_STORE, fromUrl);
    history.replaceState(null, "", location.pathname + location.search.replace(/[?&]key=[^&]*/, "").replace(/^&/, "?"));
  }
}

async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const key = localStorage.getItem(KEY_STORE);
    const headers = { ...(options.headers || {}), ...(key ? { authorization: `Bearer ${key}` } : {}) };
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401 || attempt > 0) return response;
    const entered = window.prompt("This server needs an API key:");
    if (!entered) return response;
    localStorage.setItem(KEY_STORE, entered.trim());
  }
}

function setButtons(state) {
  // state: "idle" (nothing to act on), "busy", "answered", "failed", "voted"
  const enabled = {
    idle: [], busy: [], answered: ["upvote", "downvote", "flag", "regenerate", "clear"],
    failed: ["regenerate", "clear"], voted: ["regenerate", "clear"],
  }[state];
  for (const id of ["upvote", "downvote", "flag", "regenerate", "clear"]) {
    $(id).disabled = !enabled.includes(id);
  }
  $("send").disabled = state === "busy";
}

function showNotice(text, isError) {
  const notice = $("model-notice");
  notice.hidden = !text;
  notice.textContent = text || "";
  notice.classList.toggle("error", !!isError);
}

async function loadModels() {
  let reply;
  try {
    const response = await api("/api/models");
    reply = await response.json();
    if (!response.ok) throw new Error(reply.error || `HTTP ${response.status}`);
  } catch (e) {
    showNotice(`The web server is unreachable: ${e}`, true);
    setTimeout(loadModels, MODEL_RETRY_MS);
    return;
  }
  document.body.classList.toggle("embed", !!reply.embed);
  if (!$("examples").dataset.filled) fillExamples(reply.examples || []);
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...reply.models.map((name) => new Option(name, name)));
  const wanted = new URLSearchParams(location.search).get("model");
  if (wanted && reply.models.includes(wanted)) select.value = wanted;
  else if (previous && reply.models.includes(previous)) select.value = previous;
  if (reply.error) showNotice(`${reply.error}. Retrying every few seconds.`, true);
  else showNotice(reply.notice || "", false);
  // An empty list is fetched again: a worker registers once its model has loaded.
  if (reply.models.length === 0) setTimeout(loadModels, MODEL_RETRY_MS);
}

function fillExamples(examples) {
  const box = $("examples");
  box.dataset.filled = "1";
  for (const example of examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    const img = document.createElement("img");
    img.src = example.image;
    img.alt = "";
    button.append(img, document.createTextNode(example.question));
    button.addEventListener("click", async () => {
      const blob = await (await fetch(example.image)).blob();
      setPendingImage(await readAsDataUrl(blob));
      $("textbox").value = example.question;
    });
    box.append(button);
  }
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function setPendingImage(dataUrl) {
  pendingImage = dataUrl;
  $("image-preview").hidden = !dataUrl;
  $("image-hint").hidden = !!dataUrl;
  $("image-remove").hidden = !dataUrl;
  if (dataUrl) $("image-preview").src = dataUrl;
  else $("image-preview").removeAttribute("src");
  $("image-input").value = "";
}

function processMode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function render() {
  const chat = $("chatbot");
  const label = chat.querySelector(".chat-label");
  chat.replaceChildren(label);
  if (!conversation) return;
  conversation.exchanges.forEach(([user, reply], i) => {
    const bubble = document.createElement("div");
    bubble.className = "message user";
    if (i === 0 && conversation.image) {
      const img = document.createElement("img");
      img.src = conversation.image;
      img.alt = "user upload image";
      bubble.append(img);
      user = user.replace("<image>", "").trim();
    }
    bubble.append(document.createTextNode(user));
    chat.append(bubble);
    const last = i === conversation.exchanges.length - 1;
    if (reply !== null || (last && generating)) {
      const answer = document.createElement("div");
      answer.className = "message bot";
      if (last && conversation.failed) answer.classList.add("error");
      answer.textContent = reply === null ? CURSOR : reply;
      chat.append(answer);
    }
  });
  chat.scrollTop = chat.scrollHeight;
}

function setReply(text) {
  conversation.exchanges[conversation.exchanges.length - 1][1] = text;
  render();
}

async function answer(newMessage) {
  generating = true;
  conversation.failed = false;
  setButtons("busy");
  render();
  const body = {
    model: $("model").value,
    template: conversation.template,
    messages: conversation.exchanges,
    new_message: newMessage,
    image: conversation.image,
    image_process_mode: processMode(),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_new_tokens: Number($("max-tokens").value),
  };
  let outcome = "failed";
  try {
    const response = await api("/api/chat", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: response.statusText }));
      throw new Error(error.error || `HTTP ${response.status}`);
    }
    outcome = await readAnswer(response.body.getReader());
  } catch (e) {
    conversation.failed = true;
    setReply(`Error: ${e.message || e}`);
  }
  generating = false;
  setButtons(outcome);
  render();
  // A failure about models may mean the list is stale.
  if (outcome === "failed") loadModels();
}

async function readAnswer(reader) {
  const decoder = new TextDecoder();
  let pending = "";
  let outcome = "failed";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      if (!line.trim()) continue;
      const event = JSON.parse(line);
      if (event.type === "start") {
        const last = conversation.exchanges[conversation.exchanges.length - 1];
        last[0] = event.user;
        conversation.template = event.template;
        render();
      } else if (event.type === "text") {
        setReply(event.text + CURSOR);
      } else if (event.type === "done") {
        setReply(event.text);
        outcome = "answered";
      } else if (event.type === "error") {
        conversation.failed = true;
        setReply(`Error: ${event.message}`);
        outcome = "failed";
      }
    }
  }
  if (outcome !== "answered" && !conversation.failed) {
    conversation.failed = true;
    setReply("Error: the answer stream ended early (the web server stopped?)");
  }
  return outcome;
}

function send() {
  if (generating) return;
  const text = $("textbox").value;
  if (!text && !pendingImage) return;
  if (!$("model").value) {
    showNotice("Choose a model first: the list is empty (no worker has registered yet).", true);
    return;
  }
  if (pendingImage) {
    // A new image starts a new conversation, as in the release.
    conversation = { image: pendingImage, template: null, exchanges: [], failed: false };
    setPendingImage(null);
  } else if (!conversation) {
    conversation = { image: null, template: null, exchanges: [], failed: false };
  }
  conversation.exchanges.push([text, null]);
  $("textbox").value = "";
  answer(true);
}

async function vote(kind) {
  if (!conversation || !conversation.template) return;
  $("textbox").value = "";
  setButtons("voted");
  await api("/api/vote", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({
      type: kind, model: $("model").value, template: conversation.template,
      messages: conversation.exchanges, has_image: !!conversation.image,
    }),
  });
}

function setUp() {
  $("input-row").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("textbox").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  $("image-input").addEventListener("change", async () => {
    const file = $("image-input").files[0];
    if (file) setPendingImage(await readAsDataUrl(file));
  });
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) setPendingImage(await readAsDataUrl(file));
  });
  $("image-remove").addEventListener("click", () => setPendingImage(null));
  for (const [slider, output] of [["temperature", "temperature-value"], ["top-p", "top-p-value"], ["max-tokens", "max-tokens-value"]]) {
    $(slider).addEventListener("input", () => { $(output).textContent = $(slider).value; });
  }
  $("regenerate").addEventListener("click", () => {
    if (!conversation || generating || conversation.exchanges.length === 0) return;
    setReply(null);
    answer(false);
  });
  $("clear").addEventListener("click", () => {
    conversation = null;
    $("textbox").value = "";
    setPendingImage(null);
    setButtons("idle");
    render();
  });
  $("upvote").addEventListener("click", () => vote("upvote"));
  $("downvote").addEventListener("click", () => vote("downvote"));
  $("flag").addEventListener("click", () => vote("flag"));
  setButtons("idle");
  loadModels();
}

setUp();
