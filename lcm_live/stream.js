// The webcam tab's fast path (lcm_live/stream.py): the camera is captured here at 640x480, sent as JPEG over a
// WebSocket with at most two frames unanswered, and each generated frame is shown as it arrives. Where the socket
// cannot be opened, the Gradio webcam below takes over and the HUD says so. Runs as gr.HTML's js_on_load:
// `element` is the panel.
const find = (selector) => document.querySelector(selector);
const button = element.querySelector(".live-start");
const video = element.querySelector(".live-self");
const out = element.querySelector(".live-out");
const hud = element.querySelector(".live-hud");
const views = element.querySelector(".live-views");
const canvas = document.createElement("canvas");
const MAX_SEND_FPS = 30; // a camera's pace; the server answers each frame, so a slower model sends fewer
const style = document.createElement("style");
style.textContent = "body.lcm-live-fast #cam-input, body.lcm-live-fast #cam-image, body.lcm-live-fast #cam-hud"
  + " { display: none !important; }";
document.head.appendChild(style);
document.body.classList.add("lcm-live-fast");

// What tests and `python -m lcm_live.bench transport` read.
const state = (window.lcmLive = { mode: "idle", shown: 0, sent: 0, latencies: [], shownAt: [], params: null,
  reason: "", errors: [] });
let socket = null, camera = null, running = false, ready = false, capturing = false, pumpTimer = null;
let inFlight = [], sentOnSocket = 0, lastSent = 0, lastParams = "", shownImage = null, readyTimer = null;
let maxInFlight = 2, reconnects = 0, serverHud = "", nextDue = 0, fresh = true;

function show(text) { hud.textContent = text; }

function token() {
  const box = find("#cam-live-token textarea, #cam-live-token input");
  return box ? box.value : "";
}

function value(selector) {
  const input = find(selector);
  return input ? input.value : undefined;
}

function params() {
  const control = find("#cam-control input[type=radio]:checked");
  return { type: "params", prompt: value("#cam-prompt textarea") || "",
    strength: Number(value("#cam-strength input[type=number]")), steps: Number(value("#cam-steps input[type=number]")),
    seed: Number(value("#cam-seed input")), control: control ? control.value : "off",
    control_scale: Number(value("#cam-control-scale input[type=number]") ?? 1),
    edge_low: Number(value("#cam-edges-low input[type=number]") ?? 100),
    edge_high: Number(value("#cam-edges-high input[type=number]") ?? 200) };
}

function fallback(reason) {
  state.mode = "fallback";
  state.reason = reason;
  running = false;
  stopCamera();
  views.style.display = "none";
  button.disabled = true;
  document.body.classList.remove("lcm-live-fast");
  show("Fast stream unavailable (" + reason + "): using the slower Gradio stream below; "
    + "press \"Click to Access Webcam\", then record.");
}

function stopCamera() {
  if (camera) camera.getTracks().forEach((track) => track.stop());
  camera = null;
  video.srcObject = null;
}

async function waitForToken() {
  for (let i = 0; i < 50 && !token(); i++) await new Promise((r) => setTimeout(r, 100));
  return token();
}

async function start() {
  if (running) { stop("Stopped."); return; }
  if (!(await waitForToken())) { fallback("the page got no token for it"); return; }
  try {
    camera = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } },
      audio: false });
  } catch (error) {
    show("The camera could not be opened (" + error.name + "); browsers grant it only on localhost or HTTPS pages.");
    return;
  }
  video.srcObject = camera;
  await video.play().catch(() => {});
  running = true;
  button.textContent = "Stop camera";
  connect();
}

function stop(message) {
  running = false;
  button.textContent = "Start camera";
  stopCamera();
  if (socket) socket.close(1000);
  socket = null;
  if (state.mode === "socket") state.mode = "idle";
  show(message);
}

function connect() {
  ready = false;
  inFlight = [];
  sentOnSocket = 0;
  lastParams = "";
  const url = new URL("live/ws", new URL(".", window.location.href));
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", token());
  let ws;
  try { ws = new WebSocket(url); } catch (error) { fallback("the connection could not be opened"); return; }
  ws.binaryType = "arraybuffer";
  socket = ws;
  show("Connecting the fast stream...");
  readyTimer = setTimeout(() => {
    if (!ready && socket === ws) { socket = null; ws.close(); fallback("no answer from the server"); }
  }, 5000);
  ws.onmessage = (event) => receive(ws, event);
  ws.onclose = (event) => closed(ws, event);
}

function closed(ws, event) {
  clearTimeout(readyTimer);
  if (socket !== ws) return;
  socket = null;
  if (!ready) { fallback(event.reason || "the server refused the connection"); return; }
  if (running && reconnects < 3) { // a dropped connection: try again, then give up
    reconnects += 1;
    show("The fast stream was cut; reconnecting...");
    setTimeout(() => { if (running && !socket) connect(); }, 500 * reconnects);
  } else if (running) {
    stop("The fast stream was cut; press Start camera to try again.");
  }
}

function answered(frame) {
  const index = inFlight.findIndex((sent) => sent.frame === frame);
  if (index < 0) return undefined;
  const sent = inFlight[index];
  inFlight.splice(index, 1);
  return sent.at;
}

function receive(ws, event) {
  if (socket !== ws) return;
  if (typeof event.data === "string") {
    const message = JSON.parse(event.data);
    if (message.type === "ready") {
      ready = true;
      clearTimeout(readyTimer);
      maxInFlight = Math.max(1, Math.min(2, message.in_flight || 2));
      state.mode = "socket";
      show("Fast stream connected; waiting for the first frame...");
    }
    if (message.frame !== undefined) answered(message.frame);
    if (message.type === "error") {
      state.errors.push(message.message);
      if (message.fatal) { stop(message.message); return; }
      show("Error: " + message.message);
    }
    pump();
    return;
  }
  const size = new DataView(event.data).getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(event.data, 4, size)));
  const sentAt = answered(header.frame);
  const url = URL.createObjectURL(new Blob([new Uint8Array(event.data, 4 + size)], { type: "image/jpeg" }));
  const image = new Image();
  image.src = url;
  image.decode().then(() => shown(url, header, sentAt), () => URL.revokeObjectURL(url));
  reconnects = 0;
  pump();
}

function shown(url, header, sentAt) {
  const now = performance.now();
  const previous = shownImage;
  out.src = url;
  shownImage = url;
  if (previous) URL.revokeObjectURL(previous);
  out.dataset.prompt = header.params.prompt;
  out.dataset.frame = header.frame;
  state.params = header.params;
  state.shown += 1;
  state.shownAt.push(now);
  if (sentAt !== undefined) state.latencies.push(now - sentAt);
  if (state.shownAt.length > 5000) { state.shownAt.splice(0, 2500); state.latencies.splice(0, 2500); }
  serverHud = header.hud || "";
  const recent = state.shownAt.filter((t) => t > now - 2000);
  const fps = recent.length > 1 ? (recent.length - 1) / ((recent[recent.length - 1] - recent[0]) / 1000) : 0;
  const latency = state.latencies.length ? state.latencies[state.latencies.length - 1] : 0;
  show("fast stream · " + fps.toFixed(1) + " fps shown · frame to image " + latency.toFixed(0) + " ms · server: "
    + serverHud + (header.warnings && header.warnings.length ? " · " + header.warnings.join(" ") : ""));
}

function pump() {
  if (!running || !ready || !socket || socket.readyState !== WebSocket.OPEN || capturing) return;
  if (inFlight.length >= maxInFlight) return;
  const now = performance.now();
  if (document.hidden || !element.offsetParent) { // another tab is on screen: send nothing (the socket idles out)
    if (!pumpTimer) pumpTimer = setTimeout(() => { pumpTimer = null; pump(); }, 250);
    return;
  }
  // At most MAX_SEND_FPS, and only a frame the camera has not sent yet (a slow camera is not sent twice).
  const wait = Math.max(nextDue - now, fresh || now - lastSent > 200 ? 0 : 5);
  if (wait > 0 || !video.videoWidth) {
    if (!pumpTimer) pumpTimer = setTimeout(() => { pumpTimer = null; pump(); }, Math.max(wait, 5));
    return;
  }
  nextDue = Math.max(nextDue, now - 1000 / MAX_SEND_FPS) + 1000 / MAX_SEND_FPS; // late sends catch up once
  fresh = !tracksFrames;
  const ws = socket;
  const next = JSON.stringify(params());
  if (next !== lastParams) { ws.send(next); lastParams = next; }
  const scale = Math.min(1, 640 / video.videoWidth);
  canvas.width = Math.round(video.videoWidth * scale);
  canvas.height = Math.round(video.videoHeight * scale);
  const context = canvas.getContext("2d");
  context.setTransform(-1, 0, 0, 1, canvas.width, 0); // mirrored, as the preview shows it
  context.drawImage(video, 0, 0, canvas.width, canvas.height);
  capturing = true;
  const at = performance.now();
  lastSent = at;
  canvas.toBlob((blob) => {
    capturing = false;
    if (!blob || socket !== ws || ws.readyState !== WebSocket.OPEN) return;
    inFlight.push({ frame: sentOnSocket, at: at });
    sentOnSocket += 1;
    state.sent += 1;
    ws.send(blob);
    pump();
  }, "image/jpeg", 0.8);
}

const tracksFrames = "requestVideoFrameCallback" in HTMLVideoElement.prototype;
function watchCamera() { // marks each new camera frame, where the browser tells (requestVideoFrameCallback)
  if (!tracksFrames) return;
  const mark = () => { fresh = true; video.requestVideoFrameCallback(mark); };
  video.requestVideoFrameCallback(mark);
}

watchCamera();
button.addEventListener("click", start);
window.addEventListener("pagehide", () => { if (socket) socket.close(1000); });
