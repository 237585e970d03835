// A WebSocket client that is not ours: npm's `ws`. Usage: node ws_client.mjs URL
// Prints one JSON line with what it observed; the Python test asserts on it.
import { createHash, randomBytes } from "node:crypto";
import WebSocket from "ws";

const url = process.argv[2];
const out = {};
const ws = new WebSocket(url, ["stt.v1"], { perMessageDeflate: false, maxPayload: 0 });
const replies = [];
let waiter = null;
ws.on("message", (data, isBinary) => {
  replies.push({ data, isBinary });
  if (waiter) { const w = waiter; waiter = null; w(); }
});
const next = () => new Promise((resolve) => {
  if (replies.length) return resolve(replies.shift());
  waiter = () => resolve(replies.shift());
});
const sha = (b) => createHash("sha256").update(b).digest("hex");

ws.on("open", async () => {
  out.protocol = ws.protocol;
  ws.send("hello node");
  const t = await next();
  out.text = !t.isBinary && t.data.toString() === "hello node";

  const blob = randomBytes(1 << 20);
  ws.send(blob);
  const b = await next();
  out.binary_1mib = b.isBinary && sha(b.data) === sha(blob);

  // one message in three fragments
  ws.send(Buffer.from("frag-"), { binary: true, fin: false });
  ws.send(Buffer.from("ment-"), { binary: true, fin: false });
  ws.send(Buffer.from("ed"), { binary: true, fin: true });
  const f = await next();
  out.fragmented = f.data.toString() === "frag-ment-ed";

  ws.close(4003, "node bye");
});
ws.on("close", (code, reason) => {
  out.close_code = code;
  out.close_reason = reason.toString();
  console.log(JSON.stringify(out));
  process.exit(0);
});
ws.on("error", (e) => { console.log(JSON.stringify({ error: String(e) })); process.exit(1); });
setTimeout(() => { console.log(JSON.stringify({ error: "timeout", partial: out })); process.exit(1); }, 20000);
