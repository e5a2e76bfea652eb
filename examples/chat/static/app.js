// WarpSocket chat: the page. Plain JavaScript, no build step.
//
// Messages for the connection itself arrive as JSON ("{...}"); messages for one of
// its room memberships arrive as "ROOM|{...}" (the membership's virtual socket
// prefix), so routing is a split at the first "|". See worker.py for the protocol.
"use strict";

const TYPING_SEND_EVERY = 2000; // ms between our own "typing" notes
const TYPING_SHOW_FOR = 3500; // ms a "typing" note from someone else stays visible

const $ = (id) => document.getElementById(id);
const ui = {
  login: $("login"), chat: $("chat"), nameForm: $("name-form"), nameInput: $("name-input"),
  me: $("me"), status: $("status"), rooms: $("rooms"), joinForm: $("join-form"),
  roomInput: $("room-input"), membersRoom: $("members-room"), membersCount: $("members-count"),
  members: $("members"), empty: $("empty"), messages: $("messages"), typing: $("typing"),
  sendForm: $("send-form"), messageInput: $("message-input"), sendButton: $("send-button"),
  error: $("error"),
};

let ws = null;
let myId = null; // our socket id, from "welcome"
let myName = null; // the name we asked for / got
let active = null; // the room on screen
let retryDelay = 500;
let lastTypingSent = 0;
let errorTimer = null;
// room -> {items: [...], ids: Set, members: [...], v, unread, typing: Map}
const rooms = new Map();

// ---------------------------------------------------------------- connection

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/chat`);
  setStatus("connecting", "connecting…");
  ws.onopen = () => {
    retryDelay = 500;
    setStatus("online", "online");
    if (myName !== null) send({type: "hello", name: myName}); // reconnected: start over
  };
  ws.onmessage = (event) => route(event.data);
  ws.onclose = () => {
    setStatus("offline", "offline — reconnecting");
    myId = null;
    setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 10000);
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
  onRoom(data.slice(0, bar), JSON.parse(data.slice(bar + 1)));
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
        // A new connection (maybe a restarted server): rebuild every room from scratch.
        for (const [name, room] of rooms) {
          rooms.set(name, newRoom(room.unread));
          send({type: "join", room: name});
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

function onRoom(name, msg) {
  const room = roomState(name);
  switch (msg.type) {
    case "joined":
      setMembers(room, msg.v, msg.members);
      for (const entry of msg.history) addMessage(room, entry);
      break;
    case "message":
      room.typing.delete(msg.from);
      if (addMessage(room, msg) && name !== active) room.unread += 1;
      break;
    case "presence":
      setMembers(room, msg.v, msg.members);
      if (msg.from !== myId) {
        room.items.push({notice: `${msg.name} ${msg.event === "join" ? "joined" : "left"}`});
        if (msg.event === "leave") room.typing.delete(msg.from);
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

function newRoom(unread = 0) {
  return {items: [], ids: new Set(), members: [], v: -1, unread, typing: new Map()};
}

function roomState(name) {
  if (!rooms.has(name)) rooms.set(name, newRoom());
  if (!active) active = name;
  return rooms.get(name);
}

function setMembers(room, v, members) {
  // Presence events from different workers may cross on the way: keep the newest list.
  if (v > room.v) {
    room.v = v;
    room.members = members;
  }
}

function addMessage(room, msg) {
  // History and live messages may overlap or arrive out of order: merge by id.
  if (room.ids.has(msg.id)) return false;
  room.ids.add(msg.id);
  let i = room.items.length;
  while (i > 0 && room.items[i - 1].id > msg.id) i--;
  room.items.splice(i, 0, msg);
  return true;
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
  ui.members.replaceChildren(...(room ? room.members : []).map((member) => {
    const li = el("li", member.id === myId ? "me" : "", member.name);
    li.dataset.id = member.id;
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
