// The live log: text comes in as bytes, is decoded, and is appended to a plain <pre>
// once per animation frame, one block (a div holding a text node) per batch.  The page keeps about
// MAX_CHARS characters or MAX_LINES lines (whole batches are dropped from the front),
// cuts lines longer than MAX_LINE for display, and scrolls along only while the
// reader is at the bottom.  The whole log stays downloadable.

import { request } from "./api.js";

export const MAX_CHARS = 2 * 1024 * 1024;
export const MAX_LINES = 20000;
export const MAX_LINE = 10000;
export const TAIL = 1 << 20; // bytes loaded first (one answer of the logs API)
const FRAME_CHARS = 128 * 1024; // laid out per frame at most: a frame stays short
const CUT_MARK = " \u2026 [line cut for display; the download has all of it]";

function countLines(s) {
  let n = 0;
  for (let i = s.indexOf("\n"); i >= 0; i = s.indexOf("\n", i + 1)) n++;
  return n;
}

export class LogView {
  constructor(pre, onChange) {
    this.pre = pre;
    this.onChange = onChange; // called after each painted batch
    this.reset();
  }

  reset() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.pre.textContent = "";
    this.decoder = new TextDecoder("utf-8");
    this.pending = [];
    this.pendingChars = 0;
    this.batches = []; // [{node, chars, lines}], oldest first
    this.chars = 0;
    this.lines = 0;
    this.col = 0; // length of the current (last, unfinished) line
    this.cut = false; // the current line was cut already
    this.start = 0; // byte offset of the first byte received
    this.end = 0; // byte offset after the last byte received
    this.droppedBytes = 0; // bytes received but no longer shown (approximate: chars)
  }

  // Bytes [offset, offset + bytes.length) of the log.
  push(bytes, offset) {
    if (this.end === 0 && this.start === 0 && offset > 0) this.start = offset;
    this.end = offset + bytes.length;
    const text = this.decoder.decode(bytes, { stream: true });
    if (!text) return;
    // pieces of at most FRAME_CHARS (a tail of 1 MiB comes in one answer)
    for (let i = 0; i < text.length; i += FRAME_CHARS) {
      const piece = text.length <= FRAME_CHARS ? text : text.slice(i, i + FRAME_CHARS);
      this.pending.push(piece);
      this.pendingChars += piece.length;
    }
    // a hidden tab paints nothing: keep only what would be shown anyway
    while (this.pendingChars - this.pending[0].length > MAX_CHARS) {
      const dropped = this.pending.shift();
      this.pendingChars -= dropped.length;
      this.droppedBytes += dropped.length;
    }
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  // Cut lines over MAX_LINE characters; `this.col` carries a line across batches.
  cutLong(s) {
    let out = null;
    let from = 0;
    let pos = 0;
    for (;;) {
      const nl = s.indexOf("\n", pos);
      const end = nl < 0 ? s.length : nl;
      const len = this.col + (end - pos);
      if (len > MAX_LINE) {
        out = out || [];
        out.push(s.slice(from, pos + Math.max(0, MAX_LINE - this.col)));
        if (!this.cut) out.push(CUT_MARK);
        this.cut = true;
        from = end;
      }
      if (nl < 0) {
        this.col = len;
        break;
      }
      this.col = 0;
      this.cut = false;
      pos = nl + 1;
    }
    if (!out) return s;
    out.push(s.slice(from));
    return out.join("");
  }

  flush() {
    this.frame = 0;
    if (!this.pending.length) return;
    // whole pieces up to FRAME_CHARS; the rest waits for the next frame (push() drops
    // the oldest of a backlog).  Never a slice of one big joined string: a block's text
    // would keep all of it alive.
    let n = 0;
    let take = 0;
    while (n < this.pending.length && (n === 0 || take + this.pending[n].length <= FRAME_CHARS)) {
      take += this.pending[n].length;
      n++;
    }
    let text = this.pending.splice(0, n).join("");
    this.pendingChars -= take;
    if (this.pending.length) this.frame = requestAnimationFrame(() => this.flush());
    text = this.cutLong(text);
    const pre = this.pre;
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;
    // Each batch is a block of its own, so the browser lays out only the new text, not
    // all 2 MiB.  A block holds whole lines without the last newline (the block's end
    // is the line break, also for copy and paste); a line that spans two batches is
    // continued in the block it began in.
    const last = this.batches[this.batches.length - 1];
    if (last && last.open) {
      const nl = text.indexOf("\n");
      const head = nl < 0 ? text : text.slice(0, nl);
      last.node.appendData(head);
      last.chars += head.length + (nl < 0 ? 0 : 1);
      this.chars += head.length + (nl < 0 ? 0 : 1);
      if (nl >= 0) {
        last.open = false;
        last.lines += 1;
        this.lines += 1;
      }
      text = nl < 0 ? "" : text.slice(nl + 1);
    }
    if (text) {
      const open = !text.endsWith("\n");
      const body = open ? text : text.slice(0, -1);
      const node = document.createTextNode(body);
      const block = document.createElement("div");
      // an empty last line is shown by a generated space (never copied)
      if (body === "" || body.endsWith("\n")) block.className = "trail";
      block.appendChild(node);
      const batch = { block, node, open, chars: text.length, lines: countLines(text) };
      pre.appendChild(block);
      this.batches.push(batch);
      this.chars += batch.chars;
      this.lines += batch.lines;
    }
    while (this.batches.length > 1 && (this.chars > MAX_CHARS || this.lines > MAX_LINES)) {
      const old = this.batches.shift();
      old.block.remove();
      this.chars -= old.chars;
      this.lines -= old.lines;
      this.droppedBytes += old.chars;
    }
    if (this.lines > MAX_LINES) {
      // one batch with too many lines: keep its last MAX_LINES
      const b = this.batches[0];
      const t = b.node.data;
      let i = t.length;
      for (let n = 0; n <= MAX_LINES && i > 0; n++) i = t.lastIndexOf("\n", i - 1);
      b.node.deleteData(0, i + 1);
      this.droppedBytes += i + 1;
      this.chars -= i + 1;
      b.chars -= i + 1;
      this.lines = b.lines = countLines(b.node.data);
    }
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    this.onChange();
  }

  // Bytes of the log shown (approximately: characters), and the first byte shown.
  get shownFrom() {
    return Math.min(this.end, this.start + this.droppedBytes);
  }
}

// Load the last TAIL bytes of a job's log into `view`; -> the offset to follow from.
export async function loadTail(jobId, view, signal) {
  const r = await request(`/api/mpi_jobs/${encodeURIComponent(jobId)}/logs?tail=${TAIL}`, {
    signal,
    read: async (resp) => ({
      start: Number(resp.headers.get("X-Log-Start")),
      next: Number(resp.headers.get("X-Next-Offset")),
      bytes: new Uint8Array(await resp.arrayBuffer()),
    }),
    timeout: 30000,
  });
  view.reset();
  view.start = r.start;
  view.push(r.bytes, r.start);
  view.end = r.next;
  return r.next;
}

// Stream the log from `offset` into `view` until the job ends or `signal` aborts.
export async function follow(jobId, offset, view, signal) {
  const resp = await request(
    `/api/mpi_jobs/${encodeURIComponent(jobId)}/logs?follow=1&offset=${offset}`,
    // the answer starts with the first new bytes (or the job's end): a silent job's
    // follow times out and is asked again, which also proves the daemon is there
    { signal, timeout: 60000 },
  );
  const reader = resp.body.getReader();
  const stop = () => reader.cancel().catch(() => {});
  signal.addEventListener("abort", stop, { once: true });
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      view.push(value, view.end);
    }
  } finally {
    signal.removeEventListener("abort", stop);
  }
}

// The whole log, fetched in chunks with the token in a header, saved as a file.
export async function download(jobId, onProgress) {
  const parts = [];
  let offset = 0;
  for (;;) {
    const r = await request(
      `/api/mpi_jobs/${encodeURIComponent(jobId)}/logs?offset=${offset}&limit=${1 << 20}`,
      {
        timeout: 30000,
        read: async (resp) => ({
          next: Number(resp.headers.get("X-Next-Offset")),
          blob: await resp.blob(),
        }),
      },
    );
    if (r.blob.size === 0) break;
    parts.push(r.blob);
    offset = r.next;
    onProgress(offset);
  }
  const url = URL.createObjectURL(new Blob(parts, { type: "text/plain" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = `${jobId}.log`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return offset;
}
