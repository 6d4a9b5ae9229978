// The dev page: renders the emulated workspace from GET /_emulator/state (long-polled) and turns what the
// person does into POSTs to /_emulator/*, which the emulator sends on to the bot, signed, as Slack would.
"use strict";

const ui = {
  state: null,
  me: localStorage.getItem("relaybot.me"),
  channel: localStorage.getItem("relaybot.channel"),
  showHome: false,
  modalKey: null,
  collapsed: new Set(),
};

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------------------- mrkdwn

const EMOJI = {
  arrow_forward: "▶️", arrows_counterclockwise: "🔄", black_right_pointing_double_triangle_with_vertical_bar: "⏭️",
  checkered_flag: "🏁", double_vertical_bar: "⏸️", grey_question: "❔", heavy_check_mark: "✔️", hourglass: "⌛",
  large_blue_circle: "🔵", large_green_circle: "🟢", link: "🔗", octagonal_sign: "🛑", repeat: "🔁",
  white_check_mark: "✅", white_circle: "⚪", x: "❌", warning: "⚠️", lock: "🔒", key: "🔑", wave: "👋",
  rocket: "🚀", red_circle: "🔴", bell: "🔔", information_source: "ℹ️", no_entry: "⛔", tada: "🎉",
  eyes: "👀", gear: "⚙️", bulb: "💡", memo: "📝", inbox_tray: "📥", outbox_tray: "📤", pause_button: "⏸️",
};

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function unescapeSlack(text) {
  return text.replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&amp;/g, "&");
}

function userName(id) {
  const person = ui.state && ui.state.users.find((u) => u.id === id);
  return person ? person.name : id;
}

function channelName(id) {
  const channel = ui.state && ui.state.channels.find((c) => c.id === id);
  return channel ? channel.name : id;
}

function safeUrl(url) {
  return /^(https?:|mailto:)/i.test(url) ? url : null;
}

// <…> tokens of Slack's markup: links, mentions, dates.
function renderToken(inner) {
  const [target, label] = splitOnce(inner, "|");
  if (target.startsWith("@")) return `<span class="mention">@${escapeHtml(label || userName(target.slice(1)))}</span>`;
  if (target.startsWith("#")) return `<span class="mention">#${escapeHtml(label || channelName(target.slice(1)))}</span>`;
  if (target.startsWith("!subteam^")) return `<span class="mention">@${escapeHtml(label || target.slice(9))}</span>`;
  if (target.startsWith("!date^")) return escapeHtml(label || target);
  if (target.startsWith("!")) return `<span class="mention">@${escapeHtml(target.slice(1))}</span>`;
  const url = safeUrl(unescapeSlack(target));
  if (!url) return escapeHtml(unescapeSlack(label || target));
  return `<a href="${escapeHtml(url)}" target="_blank" rel="noopener">${escapeHtml(unescapeSlack(label || target))}</a>`;
}

function splitOnce(text, separator) {
  const at = text.indexOf(separator);
  return at < 0 ? [text, ""] : [text.slice(0, at), text.slice(at + 1)];
}

function mrkdwn(text) {
  // Tokens and code are set aside first, so formatting never reaches inside them.
  const kept = [];
  const keep = (html) => `\u0000${kept.push(html) - 1}\u0000`;
  let source = String(text || "");
  source = source.replace(/```([\s\S]*?)```/g, (_, code) => keep(`<pre>${escapeHtml(unescapeSlack(code))}</pre>`));
  source = source.replace(/`([^`\n]+)`/g, (_, code) => keep(`<code>${escapeHtml(unescapeSlack(code))}</code>`));
  source = source.replace(/<([^<>\n]+)>/g, (_, inner) => keep(renderToken(inner)));
  let html = escapeHtml(unescapeSlack(source));
  html = html.replace(/(^|[\s(>])\*([^*\n]+)\*(?=$|[\s.,;:!?)<])/g, "$1<b>$2</b>");
  html = html.replace(/(^|[\s(>])_([^_\n]+)_(?=$|[\s.,;:!?)<])/g, "$1<i>$2</i>");
  html = html.replace(/(^|[\s(>])~([^~\n]+)~(?=$|[\s.,;:!?)<])/g, "$1<s>$2</s>");
  html = html.replace(/:([a-z0-9_+-]+):/g, (whole, name) => EMOJI[name] || whole);
  html = html.replace(/\n/g, "<br>");
  return html.replace(/\u0000(\d+)\u0000/g, (_, index) => kept[Number(index)]);
}

function textObject(object) {
  if (!object) return "";
  if (typeof object === "string") return escapeHtml(object);
  return object.type === "mrkdwn" ? mrkdwn(object.text) : escapeHtml(object.text || "");
}

// ------------------------------------------------------------------------------------------- Block Kit

function renderButton(element, where) {
  const label = textObject(element.text);
  const url = element.url && safeUrl(element.url);
  if (url) return `<a class="button" href="${escapeHtml(url)}" target="_blank" rel="noopener">${label}</a>`;
  const style = element.style === "primary" ? "primary" : element.style === "danger" ? "danger" : "";
  const data = Object.entries({ ...where, action: element.action_id || "" })
    .map(([key, value]) => `data-${key}="${escapeHtml(value)}"`).join(" ");
  return `<button type="button" class="${style}" ${data}>${label}</button>`;
}

function renderElement(element, where) {
  if (!element) return "";
  if (element.type === "button") return renderButton(element, where);
  if (element.type === "image") return `<span class="hint">[image: ${escapeHtml(element.alt_text || "")}]</span>`;
  if (element.type === "mrkdwn" || element.type === "plain_text") return `<span>${textObject(element)}</span>`;
  return `<span class="hint">[${escapeHtml(element.type)}]</span>`;
}

function renderBlocks(blocks, where) {
  return (blocks || []).map((block) => {
    const here = { ...where, block: block.block_id || "" };
    switch (block.type) {
      case "header":
        return `<div class="block-header">${textObject(block.text)}</div>`;
      case "section": {
        const fields = (block.fields || []).map((field) => `<div>${textObject(field)}</div>`).join("");
        return `<div class="block-section"><div>${textObject(block.text)}${fields ? `<div class="fields">${fields}</div>` : ""}</div>`
          + `${block.accessory ? renderElement(block.accessory, here) : ""}</div>`;
      }
      case "context":
        return `<div class="block-context">${(block.elements || []).map((e) => renderElement(e, here)).join(" ")}</div>`;
      case "divider":
        return `<hr class="block-divider">`;
      case "actions":
        return `<div class="block-actions">${(block.elements || []).map((e) => renderElement(e, here)).join("")}</div>`;
      case "image":
        return `<div class="hint">[image: ${escapeHtml(block.alt_text || "")}]</div>`;
      case "rich_text":
        return `<div>${escapeHtml(JSON.stringify(block.elements || []).slice(0, 200))}</div>`;
      case "input":
        return renderInput(block);
      default:
        return `<div class="hint">[${escapeHtml(block.type)} block]</div>`;
    }
  }).join("");
}

function renderInput(block) {
  const element = block.element || {};
  const name = `${block.block_id}::${element.action_id}`;
  const label = `<label for="${escapeHtml(name)}">${textObject(block.label)}${block.optional ? ' <span class="hint">(optional)</span>' : ""}</label>`;
  const initial = element.initial_value || "";
  const placeholder = element.placeholder ? escapeHtml(element.placeholder.text || "") : "";
  let control;
  if (element.type === "static_select" || element.type === "radio_buttons") {
    const options = (element.options || []).map((option) => {
      const chosen = element.initial_option && element.initial_option.value === option.value ? " selected" : "";
      return `<option value="${escapeHtml(option.value)}"${chosen}>${textObject(option.text)}</option>`;
    }).join("");
    control = `<select id="${escapeHtml(name)}" name="${escapeHtml(name)}"><option value=""></option>${options}</select>`;
  } else if (element.type === "users_select") {
    control = `<select id="${escapeHtml(name)}" name="${escapeHtml(name)}"><option value=""></option>`
      + ui.state.users.map((u) => `<option value="${escapeHtml(u.id)}">${escapeHtml(u.name)}</option>`).join("") + `</select>`;
  } else if (element.type === "conversations_select" || element.type === "channels_select") {
    control = `<select id="${escapeHtml(name)}" name="${escapeHtml(name)}"><option value=""></option>`
      + ui.state.channels.map((c) => `<option value="${escapeHtml(c.id)}">#${escapeHtml(c.name)}</option>`).join("") + `</select>`;
  } else if (element.multiline) {
    control = `<textarea id="${escapeHtml(name)}" name="${escapeHtml(name)}" placeholder="${placeholder}">${escapeHtml(initial)}</textarea>`;
  } else {
    const type = element.type === "number_input" ? "number" : element.type === "email_text_input" ? "email" : "text";
    control = `<input id="${escapeHtml(name)}" name="${escapeHtml(name)}" type="${type}" value="${escapeHtml(initial)}" placeholder="${placeholder}">`;
  }
  const hint = block.hint ? `<div class="hint">${textObject(block.hint)}</div>` : "";
  return `<div class="input-block" data-block="${escapeHtml(block.block_id)}">${label}${control}${hint}<div class="field-error"></div></div>`;
}

// ------------------------------------------------------------------------------------------- rendering

function time(ts) {
  const date = new Date(parseFloat(ts) * 1000);
  return isNaN(date) ? "" : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function avatar(name, kind) {
  return `<div class="avatar ${kind}">${escapeHtml((name || "?").slice(0, 1).toUpperCase())}</div>`;
}

function body(item) {
  return item.blocks && item.blocks.length ? renderBlocks(item.blocks, { channel: ui.channel, ts: item.ts }) : `<div>${mrkdwn(item.text)}</div>`;
}

function renderMessage(message) {
  const name = message.is_bot ? "relaybot" : message.user_name;
  const replies = message.replies || [];
  const open = !ui.collapsed.has(message.ts);
  let thread = "";
  if (replies.length) {
    const items = replies.map((reply) => `<div class="reply" data-testid="thread-reply">${mrkdwn(reply.text)}`
      + `<span class="edited">${time(reply.ts)}</span></div>`).join("");
    thread = `<button type="button" class="thread-toggle" data-thread="${escapeHtml(message.ts)}">`
      + `${replies.length} ${replies.length === 1 ? "reply" : "replies"} · ${open ? "hide" : "show"}</button>`
      + (open ? `<div class="thread" data-testid="thread">${items}</div>` : "");
  }
  return `<article class="message" data-testid="message" data-ts="${escapeHtml(message.ts)}">`
    + avatar(name, message.is_bot ? "bot" : "")
    + `<div><div class="meta"><b>${escapeHtml(name)}</b>${time(message.ts)}`
    + `${message.edited ? '<span class="edited">(edited)</span>' : ""}</div>${body(message)}${thread}</div></article>`;
}

function renderEphemeral(item) {
  return `<article class="message ephemeral" data-testid="ephemeral">${avatar("relaybot", "ghost")}`
    + `<div><div class="meta"><b>relaybot</b>${time(item.ts)} <span class="only-you">Only visible to you</span></div>`
    + `${item.blocks && item.blocks.length ? renderBlocks(item.blocks, {}) : `<div>${mrkdwn(item.text)}</div>`}</div></article>`;
}

function render() {
  const state = ui.state;
  if (!state) return;
  $("workspace").textContent = `${state.team.name} · relaybot dev`;
  document.title = `#${channelName(ui.channel)} · relaybot dev`;

  const me = $("me");
  if (me.options.length !== state.users.length) {
    me.innerHTML = state.users.map((u) => `<option value="${escapeHtml(u.id)}">${escapeHtml(u.name)}${u.is_admin ? " (admin)" : ""}</option>`).join("");
  }
  me.value = ui.me;

  $("channels").innerHTML = state.channels.map((c) => `<li><a href="#${escapeHtml(c.id)}" data-channel="${escapeHtml(c.id)}"`
    + ` class="${!ui.showHome && c.id === ui.channel ? "active" : ""}"># ${escapeHtml(c.name)}</a></li>`).join("");
  $("home-link").classList.toggle("active", ui.showHome);

  $("activity").innerHTML = state.activity.slice(-12).reverse()
    .map((a) => `<li class="${a.ok ? "" : "bad"}">${mrkdwn(a.text)}</li>`).join("");

  $("messages").hidden = ui.showHome;
  $("home").hidden = !ui.showHome;
  if (ui.showHome) {
    $("channel-header").innerHTML = `relaybot <span class="topic">App Home</span>`;
    $("home").innerHTML = state.home ? renderBlocks(state.home.blocks, { view: state.home.id || "home" })
      : `<div class="empty">relaybot has not published a Home tab for you (views.publish was not called).</div>`;
  } else {
    $("channel-header").innerHTML = `# ${escapeHtml(channelName(ui.channel))}<span class="topic">${escapeHtml(ui.channel)}</span>`;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const items = (state.messages[ui.channel] || []).map((m) => ({ ts: m.ts, html: renderMessage(m) }))
      .concat((state.ephemeral[ui.channel] || []).map((e) => ({ ts: e.ts, html: renderEphemeral(e) })))
      .sort((a, b) => parseFloat(a.ts) - parseFloat(b.ts));
    box.innerHTML = items.length ? items.map((i) => i.html).join("")
      : `<div class="empty">Nothing here yet. Try <code>${escapeHtml(state.command)} help</code>, then `
        + `<code>${escapeHtml(state.command)} list</code> and <code>${escapeHtml(state.command)} enable &lt;workflow&gt;</code>.</div>`;
    if (atBottom) box.scrollTop = box.scrollHeight;
  }
  $("message-box").placeholder = `Message #${channelName(ui.channel)} — or type ${state.command} help`;
  renderEventPanel();
  renderModal();
}

function renderEventPanel() {
  const state = ui.state;
  const select = $("event-integration");
  const names = state.integrations.map((i) => i.name).join(",");
  if (select.dataset.names !== names) {
    select.dataset.names = names;
    const chosen = select.value;
    select.innerHTML = state.integrations.map((i) => `<option value="${escapeHtml(i.name)}">${escapeHtml(i.title)}</option>`).join("");
    if (chosen) select.value = chosen;
    fillExamples();
  }
  const integration = state.integrations.find((i) => i.name === select.value);
  const note = $("event-connection");
  if (!integration) {
    note.textContent = "";
  } else if (!integration.can_sign) {
    note.innerHTML = `<span class="error">The emulator has no signer for ${escapeHtml(integration.name)} yet.</span>`;
  } else if (!integration.connection) {
    note.innerHTML = `Not connected yet: <code>${escapeHtml(state.command)} enable &lt;workflow&gt;</code> or `
      + `<code>${escapeHtml(state.command)} connect ${escapeHtml(integration.name)}</code> shows the URL and secret, which the emulator reads.`;
  } else if (!integration.connection.has_secret) {
    const fix = integration.tool_secret ? "set-secret" : "rotate";
    note.innerHTML = `Sends to <code>${escapeHtml(integration.connection.url)}</code>, but the emulator does not know its secret yet: `
      + `<code>${escapeHtml(state.command)} connect ${escapeHtml(integration.name)} ${fix}</code>.`;
  } else {
    note.innerHTML = `Signed as ${escapeHtml(integration.title)} signs, sent to <code>${escapeHtml(integration.connection.url)}</code>.`;
  }
  if (integration && integration.tool_secret) {
    note.innerHTML += `<br>${escapeHtml(integration.title)} makes its own signing secret; the emulated one is `
      + `<code data-testid="tool-secret">${escapeHtml(integration.tool_secret)}</code>. Paste it into `
      + `<code>${escapeHtml(state.command)} connect ${escapeHtml(integration.name)} set-secret</code> and it signs with it.`;
  }
}

function fillExamples() {
  const integration = ui.state.integrations.find((i) => i.name === $("event-integration").value);
  const examples = integration ? integration.examples : [];
  $("event-example").innerHTML = examples.map((name) => `<option value="${escapeHtml(name)}">${escapeHtml(name)}</option>`).join("")
    + `<option value="">(your own body)</option>`;
  loadExample();
}

async function loadExample() {
  const integration = $("event-integration").value;
  const example = $("event-example").value;
  if (!integration || !example) { $("event-body").value = ""; return; }
  const response = await fetch(`/_emulator/examples/${encodeURIComponent(integration)}/${encodeURIComponent(example)}`);
  $("event-body").value = response.ok ? await response.text() : "";
}

function renderModal() {
  const modal = ui.state.modal;
  const backdrop = $("modal-backdrop");
  if (!modal) { backdrop.hidden = true; ui.modalKey = null; return; }
  const view = modal.view;
  const key = `${view.id}:${view.hash}`;
  if (key !== ui.modalKey) {  // re-rendering an unchanged view would wipe what the person typed
    ui.modalKey = key;
    $("modal-title").innerHTML = textObject(view.title) || "Modal";
    $("modal-body").innerHTML = renderBlocks(view.blocks, { view: view.id });
    $("modal-submit").innerHTML = textObject(view.submit) || "Submit";
    $("modal-submit").hidden = !view.submit && !(view.blocks || []).some((b) => b.type === "input");
    $("modal-close").innerHTML = textObject(view.close) || "Cancel";
  }
  for (const block of $("modal-body").querySelectorAll(".input-block")) {
    block.querySelector(".field-error").textContent = modal.errors[block.dataset.block] || "";
  }
  $("modal-errors").textContent = modal.errors[""] || "";
  backdrop.hidden = false;
}

// ------------------------------------------------------------------------------------------- talking

async function post(path, data) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ team: ui.state && ui.state.team.id, user: ui.me, ...data }),
  });
  let answer = {};
  try { answer = await response.json(); } catch (e) { answer = { ok: false, error: await response.text().catch(() => "") }; }
  return { status: response.status, ...answer };
}

async function poll() {
  let version = null;
  for (;;) {
    try {
      const query = new URLSearchParams({ user: ui.me || "" });
      if (version !== null) query.set("since", String(version));
      const response = await fetch(`/_emulator/state?${query}`);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const state = await response.json();
      ui.state = state;
      if (!ui.me || !state.users.some((u) => u.id === ui.me)) ui.me = (state.users.find((u) => u.is_admin) || state.users[0]).id;
      if (!ui.channel || !state.channels.some((c) => c.id === ui.channel)) ui.channel = state.channels[0].id;
      version = state.version;
      render();
    } catch (error) {
      $("channel-header").innerHTML = `<span class="error">relaybot dev is not answering (${escapeHtml(error.message)}); retrying…</span>`;
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
}

function refreshNow() {
  // The long-poll answers on the next change; this re-renders at once for choices made on the page itself.
  render();
}

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const box = $("message-box");
  const text = box.value.trim();
  if (!text) return;
  box.value = "";
  const answer = await post("/_emulator/command", { channel: ui.channel, text });
  if (!answer.ok) box.value = text;
});

$("messages").addEventListener("click", async (event) => {
  const toggle = event.target.closest("[data-thread]");
  if (toggle) {
    const ts = toggle.dataset.thread;
    if (ui.collapsed.has(ts)) ui.collapsed.delete(ts); else ui.collapsed.add(ts);
    return refreshNow();
  }
  const button = event.target.closest("button[data-action]");
  if (!button || !button.dataset.ts) return;
  button.disabled = true;
  await post("/_emulator/click", { channel: button.dataset.channel, ts: button.dataset.ts, action_id: button.dataset.action });
});

for (const container of [$("home"), $("modal-body")]) {
  container.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button || !button.dataset.view) return;
    await post("/_emulator/click", { view_id: button.dataset.view, block_id: button.dataset.block, action_id: button.dataset.action });
  });
}

$("channels").addEventListener("click", (event) => {
  const link = event.target.closest("[data-channel]");
  if (!link) return;
  event.preventDefault();
  ui.channel = link.dataset.channel;
  ui.showHome = false;
  localStorage.setItem("relaybot.channel", ui.channel);
  refreshNow();
});

$("home-link").addEventListener("click", async (event) => {
  event.preventDefault();
  ui.showHome = true;
  refreshNow();
  await post("/_emulator/home", {});
});

$("me").addEventListener("change", () => {
  ui.me = $("me").value;
  localStorage.setItem("relaybot.me", ui.me);
  ui.modalKey = null;
  fetch(`/_emulator/state?user=${encodeURIComponent(ui.me)}`).then((r) => r.json()).then((state) => { ui.state = state; render(); });
});

$("event-integration").addEventListener("change", () => { fillExamples(); renderEventPanel(); });
$("event-example").addEventListener("change", loadExample);

$("event-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("event-status");
  status.className = "";
  status.textContent = "sending…";
  const answer = await post("/_emulator/event", {
    integration: $("event-integration").value, example: $("event-example").value, body: $("event-body").value,
  });
  status.className = answer.ok ? "ok" : "error";
  status.textContent = answer.ok ? `HTTP ${answer.status}: stored as event ${answer.answer.event}${answer.answer.duplicate ? " (duplicate)" : ""}`
    : `${answer.status ? `HTTP ${answer.status}: ` : ""}${answer.error || JSON.stringify(answer.answer || "")}`;
});

$("modal").addEventListener("submit", async (event) => {
  event.preventDefault();
  const values = {};
  for (const control of $("modal-body").querySelectorAll("[name]")) {
    const [block, action] = control.name.split("::");
    (values[block] = values[block] || {})[action] = control.value;
  }
  await post("/_emulator/view/submit", { view_id: ui.state.modal.view.id, values });
});

$("modal-close").addEventListener("click", async () => {
  if (ui.state.modal) await post("/_emulator/view/close", { view_id: ui.state.modal.view.id });
});

poll();
