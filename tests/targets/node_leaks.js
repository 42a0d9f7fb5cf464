// leakprobe's Node.js test server: the seed's listener leak and three more, with its own
// ground truth. Usage: node node_leaks.js PORT
//   GET /leak    one request's worth of every leak (and temporaries that are all freed)
//   GET /stats   {"requests", "listeners", "records", "cache", "heap_used", "external"}
'use strict';
const http = require('http');
const v8 = require('v8');
const { EventEmitter } = require('events');

const emitter = new EventEmitter();
emitter.setMaxListeners(0);
const records = [];          // a global array of objects
const cache = new Map();     // a Map cache
let requests = 0;

// The seed's leak: a listener per request, never removed, each keeping a 16 KiB Buffer.
function subscribe(id) {
  const payload = Buffer.alloc(16 * 1024, id & 0xff);
  emitter.on('data', function handler(chunk) {
    return payload.length + chunk.length;
  });
}

function remember(id) {
  records.push({ id, name: 'user-' + id, tags: ['a', 'b', 'c'], history: new Array(64).fill(id) });
}

function cacheUser(id) {
  cache.set('user:' + id, { id, seen: Date.now(), blob: new Array(128).fill(id) });
}

// Temporaries: allocated and dropped within the request.
function churn(id) {
  let total = 0;
  for (let i = 0; i < 20; i++) {
    const tmp = Buffer.alloc(4096, i);
    total += tmp[0] + JSON.stringify({ i, id }).length;
  }
  return total;
}

function handle(req, res) {
  if (req.url === '/stats') {
    const h = v8.getHeapStatistics();
    const m = process.memoryUsage();
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({
      requests,
      listeners: emitter.listenerCount('data'),
      records: records.length,
      cache: cache.size,
      heap_used: h.used_heap_size,
      external: m.external,
      array_buffers: m.arrayBuffers,
    }));
    return;
  }
  if (req.url === '/gc' && global.gc) {
    global.gc();
    res.end('ok');
    return;
  }
  requests++;
  subscribe(requests);
  remember(requests);
  cacheUser(requests);
  const n = churn(requests);
  res.end(String(n));
}

const server = http.createServer(handle);
server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log("ready");
});
