'use strict';
// airlock's JavaScript driver: one warm node process; cells run in one
// persistent `vm` context, so variables and functions survive between calls.
//
// The guest agent starts this once, as the sandbox user: fd 3 carries
// commands in and fd 4 events out, one JSON object per line each way; user
// output goes to fds 1 and 2 (pipes the agent reads).
//
// Commands: {"op":"run","code":s} -> "done"; {"op":"reset"} and
// {"op":"reseed"} -> "ok". Events: "ready", "done" (status, error).
//
// Math.random in the context draws from node's CSPRNG (OpenSSL), not V8's
// per-isolate xorshift: V8's state cannot be reseeded, and guests restored
// from one snapshot would otherwise share its sequence.

const t0 = process.hrtime.bigint();
const fs = require('fs');
const net = require('net');
const path = require('path');
const util = require('util');
const vm = require('vm');
const crypto = require('crypto');
const EventEmitter = require('events');
const { createRequire } = require('module');

const CTL_IN = 3;
const CTL_OUT = 4;

let processTopLevelAwait = null;
try {
  // The REPL's own rewriter (needs --expose-internals); without it,
  // top-level await is not available.
  ({ processTopLevelAwait } = require('internal/repl/await'));
} catch (_) { /* optional */ }

function writeAll(fd, buf) {
  let off = 0;
  while (off < buf.length) {
    try {
      off += fs.writeSync(fd, buf, off, buf.length - off);
    } catch (e) {
      if (e.code !== 'EAGAIN') throw e;
      // Someone made the pipe non-blocking (node does for process.stdout):
      // wait a little for the agent to read.
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1);
    }
  }
}

function send(event) {
  writeAll(CTL_OUT, Buffer.from(JSON.stringify(event) + '\n'));
}

// Buffered output with the same policy as the Python driver: flush when 50 ms
// have passed since the last flush, when 64 KiB are pending, and at the end
// of every cell.
class Out extends EventEmitter {
  constructor(fd) { super(); this.fd = fd; this.parts = []; this.size = 0; this.last = -Infinity; }
  write(chunk) {
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(String(chunk));
    this.parts.push(buf);
    this.size += buf.length;
    // Monotonic: the wall clock may jump (Refresh sets it).
    const now = performance.now();
    if (this.size >= 65536 || now - this.last >= 50) { this.flush(); this.last = now; }
    return true;
  }
  flush() {
    if (this.size === 0) return;
    const data = Buffer.concat(this.parts, this.size);
    this.parts = [];
    this.size = 0;
    writeAll(this.fd, data);
  }
}
const stdout = new Out(1);
const stderr = new Out(2);
const userConsole = new console.Console({ stdout, stderr, colorMode: false });

// Math.random from the CSPRNG, 256 doubles per refill.
let pool = null;
let poolAt = 0;
function cryptoRandom() {
  if (pool === null || poolAt >= pool.length) {
    const words = new Uint32Array(512);
    crypto.randomFillSync(words);
    pool = new Float64Array(256);
    for (let i = 0; i < 256; i++) {
      // 53 random bits: 21 from one word, 32 from the next.
      pool[i] = ((words[2 * i] >>> 11) * 4294967296 + words[2 * i + 1]) / 9007199254740992;
    }
    poolAt = 0;
  }
  return pool[poolAt++];
}

let context = null;
let userRequire = null;
function freshContext() {
  userRequire = createRequire(path.join(process.cwd(), '[cell]'));
  const g = {
    console: userConsole,
    process,
    Buffer,
    require: userRequire,
    module: { exports: {}, require: userRequire },
    __filename: path.join(process.cwd(), '[cell]'),
    __dirname: process.cwd(),
    setTimeout, setInterval, setImmediate, clearTimeout, clearInterval, clearImmediate,
    queueMicrotask, structuredClone, URL, URLSearchParams, TextEncoder, TextDecoder,
    AbortController, AbortSignal, EventTarget, Event, atob, btoa, performance,
  };
  if (typeof fetch === 'function') g.fetch = fetch;
  g.exports = g.module.exports;
  g.global = g;
  context = vm.createContext(g, { name: 'airlock' });
  vm.runInContext('Math', context).random = cryptoRandom;
}

let running = false;
let cells = 0;
let interrupt = null; // rejects the pending top-level await on SIGINT

process.on('SIGINT', () => {
  // Synchronous code is broken off by breakOnSigint; this handles a cell
  // waiting on a top-level await. Between cells the signal is ignored.
  if (running && interrupt) interrupt(new Error('Script execution interrupted.'));
});
process.on('uncaughtException', (e) => {
  // From a timer or callback of an earlier cell: report, keep running.
  stderr.write(`Uncaught ${describe(e).traceback}\n`);
  stderr.flush();
});
process.on('unhandledRejection', (e) => {
  stderr.write(`Unhandled promise rejection: ${describe(e).traceback}\n`);
  stderr.flush();
});

function cleanStack(stack) {
  // Keep the user's frames; drop node's internals and this driver.
  return stack.split('\n').filter((l) => !(/^\s+at /.test(l)
    && (l.includes('node:') || l.includes(__filename)))).join('\n');
}

function describe(e) {
  if (e instanceof Error || (e && typeof e === 'object' && 'stack' in e && 'message' in e)) {
    return {
      name: String(e.name || 'Error'),
      value: String(e.message),
      traceback: cleanStack(String(e.stack || `${e.name}: ${e.message}`)),
    };
  }
  const text = util.inspect(e);
  return { name: 'Uncaught', value: text, traceback: `Uncaught ${text}` };
}

async function run(code) {
  cells += 1;
  const filename = `cell-${cells}.js`;
  let status = 0;
  let error = null;
  running = true;
  try {
    let script;
    let wrapped = false;
    try {
      script = new vm.Script(code, { filename });
    } catch (e) {
      const rewritten = processTopLevelAwait && /\bawait\b/.test(code)
        ? processTopLevelAwait(code) : null;
      if (!rewritten) throw e;
      script = new vm.Script(rewritten, { filename });
      wrapped = true;
    }
    let value = script.runInContext(context, { breakOnSigint: true });
    if (wrapped) {
      value = await new Promise((resolve, reject) => {
        interrupt = reject;
        Promise.resolve(value).then(resolve, reject);
      });
      value = value && value.value;
    }
    if (value !== undefined) {
      stdout.write(util.inspect(value, { depth: 4, colors: false }) + '\n');
    }
  } catch (e) {
    status = 1;
    error = describe(e);
    stderr.write(error.traceback + '\n');
  } finally {
    running = false;
    interrupt = null;
  }
  stdout.flush();
  stderr.flush();
  send({ ev: 'done', status, error });
}

function reseed() {
  // OpenSSL's DRBG reseeds from the kernel when the clock is behind its last
  // seeding, which the agent arranges while this runs.
  crypto.randomFillSync(Buffer.alloc(32));
  pool = null;
}

function main() {
  freshContext();
  // Warm the compiler and inspector paths the first cell would take.
  vm.runInContext('let __airlock_warm = [1, 2, 3].map((x) => x * 2); __airlock_warm', context);
  util.inspect({ a: [1, 2, 3], b: 'x' });
  freshContext();
  send({ ev: 'ready', ms: Number((process.hrtime.bigint() - t0) / 1000000n) });

  const ctl = new net.Socket({ fd: CTL_IN, readable: true, writable: false });
  let buffered = Buffer.alloc(0);
  let queue = Promise.resolve();
  ctl.on('data', (chunk) => {
    buffered = Buffer.concat([buffered, chunk]);
    let nl;
    while ((nl = buffered.indexOf(10)) >= 0) {
      const line = buffered.subarray(0, nl).toString();
      buffered = buffered.subarray(nl + 1);
      const cmd = JSON.parse(line);
      queue = queue.then(async () => {
        if (cmd.op === 'run') {
          await run(String(cmd.code || ''));
        } else if (cmd.op === 'reset') {
          freshContext();
          send({ ev: 'ok' });
        } else if (cmd.op === 'reseed') {
          reseed();
          send({ ev: 'ok' });
        } else {
          send({ ev: 'error', message: `unknown op ${cmd.op}` });
        }
      });
    }
  });
  // The agent closed the pipe: nothing more to do.
  ctl.on('end', () => process.exit(0));
  ctl.on('error', () => process.exit(0));
}

main();
