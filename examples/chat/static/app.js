// WarpSocket chat: the page. Plain JavaScript, no build step.
//
// Messages for the connection itself arrive as JSON ("{...}"); messages for one of
// its room memberships arrive as "ROOM|{...}" (the membership's virtual socket
// prefix), so routing is a split at the first "|". Chat messages are stamped with
// their offset in the room's history, "ROOM|17:{...}". See worker.py for the protocol.
//
// A room's member list (the names of the users present, each once however many tabs
// they have) comes from "joined" when we join it; the "presence" notes that follow
// add and remove names.
//
// The page keeps each room's epoch and last offset. When its connection drops it
// reconnects by itself and joins its rooms again with them; the server then sends
// exactly what was missed, or a fresh history page that replaces the room's messages.
"use strict";

const TYPING_SEND_EVERY = 2000; // ms between our own "typing" notes
const TYPING_SHOW_FOR = 3500; // ms a "typing" note from someone else stays visible
const RETRY_FIRST = 250; // ms before the first reconnect attempt after a drop
const RETRY_MAX = 5000; // ms between attempts at most (the delay doubles per failure)

const $ = (id) => document.getElementById(id);
const ui = {
  login: $("login"), chat: $("chat"), nameForm: $("name-form"), nameInput: $("name-input"),
  me: $("me"), status: $("status"), rooms: $("rooms"), joinForm: $("join-form"),
  roomInput: $("room-input"), membersRoom: $("members-room"), membersCount: $("members-count"),
  members: $("members"), empty: $("empty"), messages: $("messages"), typing: $("typing"),
  sendForm: $("send-form"), messageInput: $("message-input"), sendButton: $("send-button"),
  error: $("error"),
};

const servers = serverUrls();
let server = 0; // index in servers of the one we use
let ws = null;
let myId = null; // our socket id, from "welcome"
let myName = null; // the name we asked for / got
let active = null; // the room on screen
let retryDelay = RETRY_FIRST;
let lastTypingSent = 0;
let errorTimer = null;
// room -> {items: [...], epoch, offset, members: [...names], unread, typing: Map}
// items are messages ({id: offset, ...}, in offset order) and notices ({notice}).
const rooms = new Map();

// ---------------------------------------------------------------- connection

// Where to connect: this page's own server, then the alternatives given as
// `?ws=ws://HOST:PORT/chat` (repeatable), e.g. the other nodes of a cluster. Only
// other ports of the page's own host are taken, so that a link cannot point the
// page at somebody else's server.
function serverUrls() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const urls = [`${scheme}://${location.host}/chat`];
  for (const alternative of new URLSearchParams(location.search).getAll("ws")) {
    let url;
    try {
      url = new URL(alternative);
    } catch {
      continue;
    }
    if ((url.protocol === "ws:" || url.protocol === "wss:") && url.hostname === location.hostname &&
        !urls.includes(url.href)) urls.push(url.href);
  }
  return urls;
}

function connect() {
  const socket = new WebSocket(servers[server]);
  ws = socket;
  setStatus("connecting", "connecting…");
  socket.onopen = () => {
    retryDelay = RETRY_FIRST;
    setStatus("online", "online");
    if (myName !== null) send({type: "hello", name: myName}); // reconnected: start over
  };
  socket.onmessage = (event) => route(event.data);
  socket.onclose = () => {
    setStatus("offline", "offline — reconnecting");
    myId = null;
    // A drop or a failed attempt: try the next server (the same one if there is only one).
    server = (server + 1) % servers.length;
    setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, RETRY_MAX);
  };
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function route(data) {
  if (typeof data !== "string") return;
  if (data.startsWith("{")) return onDirect(JSON.parse(data));
  const bar = data.indexOf("|");
  if (bar < 0) return;
  const name = data.slice(0, bar);
  const body = data.slice(bar + 1);
  const stamp = /^(\d+):/.exec(body);
  if (stamp) return onMessage(name, Number(stamp[1]), JSON.parse(body.slice(stamp[0].length)));
  onRoom(name, JSON.parse(body));
}

// ---------------------------------------------------------------- messages from the server

function onDirect(msg) {
  switch (msg.type) {
    case "welcome": {
      const reconnect = myId === null && rooms.size > 0;
      myId = msg.id;
      myName = msg.name;
      ui.me.textContent = myName;
      ui.login.hidden = true;
      ui.chat.hidden = false;
      if (reconnect) {
        // A new connection (maybe to a restarted server or another node): join every
        // room again from where we are. The messages stay; the server sends what we
        // missed, or a history page that replaces them. Member lists start over: the
        // "joined" answer brings them again.
        for (const [name, room] of rooms) {
          room.members = [];
          room.typing.clear();
          const join = {type: "join", room: name};
          if (room.epoch !== null) join.since = [room.epoch, room.offset];
          send(join);
        }
        render();
      }
      if (!active) ui.roomInput.focus();
      break;
    }
    case "left":
      rooms.delete(msg.room);
      if (active === msg.room) active = rooms.size ? rooms.keys().next().value : null;
      render();
      break;
    case "error":
      showError(msg.message);
      break;
  }
}

// A chat message: stamped with its offset, which is its id.
function onMessage(name, offset, msg) {
  const room = roomState(name);
  // The server sends each offset once and in order; this only guards the page.
  if (offset <= room.offset) return;
  room.offset = offset;
  room.items.push({...msg, id: offset});
  room.typing.delete(msg.from);
  if (name !== active) room.unread += 1;
  render();
}

function onRoom(name, msg) {
  const room = roomState(name);
  switch (msg.type) {
    case "joined":
      // Who is here now; notes that arrived before it are older than it.
      room.members = msg.members.slice();
      break;
    case "history":
      // The room's kept messages up to msg.offset; later ones follow, stamped. It
      // replaces what the page had: after a reconnect the server could not say what
      // we missed (a new epoch: its offsets start again), so start from its page.
      room.epoch = msg.epoch;
      room.offset = msg.offset;
      room.items = msg.messages.slice();
      break;
    case "presence":
      // A user arrived (their first tab in the room) or left (their last one). Our own
      // arrival is no news to us; the list may show a change already: then it stays.
      if (msg.event === "join") {
        if (!room.members.includes(msg.name)) room.members = sortNames([...room.members, msg.name]);
      } else {
        room.members = room.members.filter((name) => name !== msg.name);
        for (const [id, entry] of room.typing) if (entry.name === msg.name) room.typing.delete(id);
      }
      if (msg.name !== myName) {
        room.items.push({notice: `${msg.name} ${msg.event === "join" ? "joined" : "left"}`});
      }
      break;
    case "typing":
      if (msg.from === myId) return;
      room.typing.set(msg.from, {name: msg.name, until: Date.now() + TYPING_SHOW_FOR});
      setTimeout(renderTyping, TYPING_SHOW_FOR + 50);
      break;
  }
  render();
}

function newRoom() {
  return {items: [], epoch: null, offset: 0, members: [], unread: 0, typing: new Map()};
}

function roomState(name) {
  if (!rooms.has(name)) rooms.set(name, newRoom());
  if (!active) active = name;
  return rooms.get(name);
}

// Case-insensitively, like the server's lists.
function sortNames(names) {
  const key = (name) => name.toLowerCase();
  return names.sort((a, b) => key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : a < b ? -1 : a > b ? 1 : 0);
}

// ---------------------------------------------------------------- rendering

function render() {
  renderRooms();
  const room = active ? rooms.get(active) : null;
  ui.empty.hidden = Boolean(room);
  ui.messages.hidden = !room;
  ui.messageInput.disabled = ui.sendButton.disabled = !room;
  ui.messageInput.placeholder = room ? `Message #${active}` : "Message";
  ui.membersRoom.textContent = room ? `#${active}` : "—";
  ui.membersCount.textContent = room ? `(${room.members.length})` : "";
  renderMembers(room);
  renderMessages(room);
  renderTyping();
}

function renderRooms() {
  ui.rooms.replaceChildren(...[...rooms.keys()].sort().map((name) => {
    const room = rooms.get(name);
    const li = el("li", name === active ? "active" : "");
    li.dataset.room = name;
    li.append(el("span", "room-name", `#${name}`));
    if (room.unread) li.append(el("span", "unread", String(room.unread)));
    const leave = el("button", "leave", "×");
    leave.type = "button";
    leave.title = `leave #${name}`;
    leave.onclick = (event) => {
      event.stopPropagation();
      send({type: "leave", room: name});
    };
    li.append(leave);
    li.onclick = () => switchTo(name);
    return li;
  }));
}

function renderMembers(room) {
  ui.members.replaceChildren(...(room ? room.members : []).map((name) => {
    const li = el("li", name === myName ? "me" : "", name);
    li.dataset.name = name;
    return li;
  }));
}

function renderMessages(room) {
  if (!room) return ui.messages.replaceChildren();
  const atBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
  ui.messages.replaceChildren(...room.items.map((item) => {
    if (item.notice) return el("li", "notice", item.notice);
    const li = el("li", item.from === myId ? "message mine" : "message");
    li.dataset.id = item.id;
    const meta = el("div", "meta");
    meta.append(el("span", "author", item.name), el("time", "", clock(item.ts)));
    li.append(meta, el("div", "text", item.text));
    return li;
  }));
  if (atBottom || room.items.length < 2) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderTyping() {
  const room = active ? rooms.get(active) : null;
  const now = Date.now();
  const who = [];
  if (room) {
    for (const [id, entry] of room.typing) {
      if (entry.until > now) who.push(entry.name);
      else room.typing.delete(id);
    }
  }
  ui.typing.textContent =
    who.length === 0 ? "" :
    who.length === 1 ? `${who[0]} is typing…` :
    who.length === 2 ? `${who[0]} and ${who[1]} are typing…` : "several people are typing…";
}

function switchTo(name) {
  active = name;
  rooms.get(name).unread = 0;
  render();
  ui.messages.scrollTop = ui.messages.scrollHeight;
  ui.messageInput.focus();
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // never innerHTML: names and texts are user input
  return node;
}

function clock(ts) {
  return new Date(ts).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
}

function setStatus(kind, text) {
  ui.status.className = `status ${kind}`;
  ui.status.textContent = text;
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => { ui.error.hidden = true; }, 4000);
}

// ---------------------------------------------------------------- user actions

ui.nameForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = ui.nameInput.value.trim();
  if (!name) return;
  myName = name;
  send({type: "hello", name});
});

ui.joinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = ui.roomInput.value.trim().toLowerCase();
  if (!name) return;
  ui.roomInput.value = "";
  if (!rooms.has(name)) {
    rooms.set(name, newRoom());
    send({type: "join", room: name});
  }
  switchTo(name);
});

ui.sendForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.messageInput.value;
  if (!active || !text.trim()) return;
  send({type: "say", room: active, text});
  ui.messageInput.value = "";
  lastTypingSent = 0;
});

ui.messageInput.addEventListener("input", () => {
  const now = Date.now();
  if (active && ui.messageInput.value && now - lastTypingSent > TYPING_SEND_EVERY) {
    lastTypingSent = now;
    send({type: "typing", room: active});
  }
});

connect();
