// Benchmark target: an http server under wrk, allocating as servers do per request (a JSON
// body, a Buffer, a few objects), nothing kept. Prints "ready" once it listens.
'use strict';
const http = require('http');
const port = Number(process.argv[2] || 8099);
let n = 0;
http.createServer((req, res) => {
  n++;
  const items = [];
  for (let i = 0; i < 20; i++) items.push({ id: n * 20 + i, name: 'item-' + i, tags: ['a', 'b'] });
  const body = Buffer.from(JSON.stringify({ n, items }));
  res.setHeader('content-type', 'application/json');
  res.end(body);
}).listen(port, '127.0.0.1', () => console.log('ready'));
