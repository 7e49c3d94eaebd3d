// One Scheduler/Generate call from Node.js, for tests/clients/test_node.py.
//   node generate.js HOST:PORT '{"prompt_token_ids": [5, 6, 7], "max_tokens": 8, "temperature": 0}'
// Prints one JSON line per response ({token_ids, text, finish_reason}), or one
// {"error": {code, name, details}} line when the call fails; exits 0 either way
// (the test judges), 2 on bad usage.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, body] = process.argv.slice(2);
if (!address || !body) {
  console.error("usage: node generate.js HOST:PORT REQUEST_JSON");
  process.exit(2);
}
const protos = path.resolve(__dirname, "../../../protos");
const def = protoLoader.loadSync(path.join(protos, "disagg/v1/scheduler.proto"), {
  includeDirs: [protos],
  keepCase: true, // field names as in the .proto: prompt_token_ids, finish_reason
  longs: String,
  defaults: true,
});
const { Scheduler } = grpc.loadPackageDefinition(def).disagg.v1;
const client = new Scheduler(address, grpc.credentials.createInsecure());
const call = client.Generate(JSON.parse(body), { deadline: Date.now() + 60000 });
call.on("data", (r) =>
  console.log(JSON.stringify({ token_ids: r.token_ids, text: r.text, finish_reason: r.finish_reason })),
);
call.on("error", (e) => {
  const name = Object.keys(grpc.status).find((k) => grpc.status[k] === e.code);
  console.log(JSON.stringify({ error: { code: e.code, name, details: e.details } }));
});
call.on("close", () => client.close());
