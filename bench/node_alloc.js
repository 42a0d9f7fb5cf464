// Benchmark target for bench/sample_cost.sh: Buffers allocated from a few JavaScript frames
// deep (each Buffer.allocUnsafeSlow is a malloc in node's ArrayBuffer allocator), most dropped
// at once, a ring of 4096 kept. Prints "ready", waits for a line on stdin, allocates for
// SECONDS, prints "OPS ops/s".
// Usage: node node_alloc.js [SECONDS]
'use strict';
const seconds = Number(process.argv[2] || 3);
const ring = new Array(4096);
let n = 0;

function leaf(size) {
  return Buffer.allocUnsafeSlow(size);
}
function middle(size) {
  return leaf(size);
}
function outer(i) {
  const b = middle(512 + (i % 8) * 1024);
  if (i % 64 === 0) ring[(i >> 6) % ring.length] = b;
}

console.log('ready');
process.stdin.once('data', () => {
  const end = Date.now() + seconds * 1000;
  const t0 = process.hrtime.bigint();
  while (Date.now() < end) {
    for (let k = 0; k < 1000; k++) outer(n++);
  }
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(`${Math.round(n / s)} ops/s`);
  process.exit(0);
});
