// Shows each message of the room once, in order, however often the connection drops.
let epoch = "", offset = 0, pending = null, delay = 250, socket;
const list = document.getElementById("messages");

function show(n, text) {
  offset = n;
  list.append(Object.assign(document.createElement("li"), {textContent: text}));
}

function connect() {
  socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`);
  socket.onopen = () => {
    delay = 250;
    pending = [];  // room messages wait for the server's answer
    socket.send(JSON.stringify({type: "resume", epoch, offset}));
  };
  socket.onmessage = ({data}) => {
    const stamp = /^(\d+):/.exec(data);  // "17:hello": the room's message 17
    if (stamp && !pending) return show(Number(stamp[1]), data.slice(stamp[0].length));
    if (stamp) return pending.push([Number(stamp[1]), data.slice(stamp[0].length)]);
    const answer = JSON.parse(data);
    if (answer.type === "reset") {  // a first visit or too much missed: the latest page
      epoch = answer.epoch;
      list.replaceChildren();
      answer.messages.forEach(([n, text]) => show(n, text));
      offset = answer.offset;
    }
    pending.filter(([n]) => n > offset).forEach(([n, text]) => show(n, text));
    pending = null;
  };
  socket.onclose = () => {
    setTimeout(connect, delay);
    delay = Math.min(delay * 2, 10000);
  };
}

connect();
