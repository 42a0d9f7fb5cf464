// Benchmark target: a Node heap of about MIB MiB of small objects (for the snapshot pause),
// kept alive (a global: a module-level const no closure uses would be garbage once the module
// has run); prints "ready" when built. Usage: node --max-old-space-size=4096 node_heap.js MIB
'use strict';
const mib = Number(process.argv[2] || 100);
const keep = [];
globalThis.keep = keep;
const v8 = require('v8');
while (v8.getHeapStatistics().used_heap_size < mib * 1048576) {
  const chunk = [];
  for (let i = 0; i < 10000; i++) chunk.push({ i, s: 'x' + i, a: [i, i + 1] });
  keep.push(chunk);
}
console.log('ready');
setInterval(() => {}, 1000);
