// The AWS SDK for JavaScript v3 against `meterd emulator`, driven by tests/python/test_compat.py.
// Reads {endpoint, region, key, secret, maxAttempts, cases: [{name, op, input}]} as JSON from
// the file named on the command line; prints one JSON result per case. A `Timestamp` given
// as epoch seconds becomes a Date. Each error reports whether it is the package's typed class.
import { readFileSync } from "node:fs";
import * as mm from "@aws-sdk/client-marketplace-metering";

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const client = new mm.MarketplaceMeteringClient({
  endpoint: spec.endpoint,
  region: spec.region,
  maxAttempts: spec.maxAttempts ?? 1,
  ...(spec.key ? { credentials: { accessKeyId: spec.key, secretAccessKey: spec.secret } } : {}),
});

function dates(value) {
  if (Array.isArray(value)) return value.map(dates);
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.entries(value).map(([k, v]) => [k, k === "Timestamp" ? new Date(v * 1000) : dates(v)]),
    );
  }
  return value;
}

const results = [];
for (const c of spec.cases) {
  const Command = mm[`${c.op}Command`];
  try {
    const out = await client.send(new Command(dates(c.input)));
    delete out.$metadata;
    results.push({ name: c.name, ok: true, output: out });
  } catch (err) {
    const modeled = mm[err.name];
    results.push({
      name: c.name,
      ok: false,
      code: err.name,
      status: err.$metadata?.httpStatusCode ?? null,
      typed: typeof modeled === "function" && err instanceof modeled && err instanceof mm.MarketplaceMeteringServiceException,
      attempts: err.$metadata?.attempts ?? null,
      message: err.message,
    });
  }
}
console.log(JSON.stringify({ offset: client.config.systemClockOffset ?? 0, results }));
