// A Moleculer.js node on the cluster of a moleculerpy-cqrs node (the profile example).
//
//   node client.mjs NATS_URL COUNT
//
// Talks to the test on stdin/stdout, one JSON object a line. It says {"started"} once its broker
// is up and sees the profile services, then waits for "go" (the test first makes sure the Python
// node knows this node's subscription to profile.updated: Moleculer.js announces it about a
// second after start() resolves). Then it stores COUNT profile updates and says {"saved"};
// on "read" it reads the summary aggregate, provokes a 422 and a 404, sends one command three
// times with one idempotency key (twice the same, once with other params), and says {"report"};
// on "stop" it stops its broker and exits.
import { createInterface } from "node:readline";

import moleculer from "moleculer";

const [url, countArg] = process.argv.slice(2);
const count = Number(countArg);
const COUNTRIES = ["NZ", "AU", "US"];

const say = (message) => process.stdout.write(`${JSON.stringify(message)}\n`);
const stdin = createInterface({ input: process.stdin });
const commands = stdin[Symbol.asyncIterator]();

async function expect(command) {
	const { value, done } = await commands.next();
	if (done || value.trim() !== command) {
		throw new Error(`expected ${command} on stdin, got ${done ? "end of input" : value}`);
	}
}

// Stored event id -> how many times profile.updated arrived with it, and its last shape.
const heard = new Map();
const shapes = new Map();

// No namespace: MoleculerPy ignores it, so a namespaced Moleculer.js node would not see it.
const broker = new moleculer.ServiceBroker({
	nodeID: "js-node",
	transporter: url,
	logger: false,
	requestTimeout: 20_000,
});

broker.createService({
	name: "jsWatcher",
	events: {
		"profile.updated"(ctx) {
			heard.set(ctx.params.id, (heard.get(ctx.params.id) ?? 0) + 1);
			shapes.set(ctx.params.id, { version: ctx.params.version, payload: ctx.params.payload });
		},
	},
});

async function failure(action, params, options) {
	try {
		const answer = await broker.call(action, params, options);
		return { unexpected: answer };
	} catch (error) {
		return { name: error.name, code: error.code, type: error.type, message: error.message };
	}
}

async function main() {
	await broker.start();
	await broker.waitForServices(["profile", "profileSummaryAggregate"], 20_000);
	say({ started: broker.nodeID });

	await expect("go");
	const profiles = Array.from({ length: count }, (_, i) => ({
		name: `js-${i}`,
		country: COUNTRIES[i % COUNTRIES.length],
		married: i % 2 === 0,
		student: i % 5 === 0,
	}));
	const saved = await Promise.all(profiles.map((p) => broker.call("profile.update", p)));
	say({ saved });

	await expect("read");
	// A round trip to the Python node: every event it emitted before answering has been
	// handled here by the time the answer arrives (one NATS connection each way, in order).
	const eventStore = await broker.call("profileEventStore.status", {});
	const report = {
		heard: Object.fromEntries(heard),
		shapes: Object.fromEntries(shapes),
		eventStore,
		found: await broker.call("profileSummaryAggregate.find", { country: "NZ" }),
		pages: [
			await broker.call("profileSummaryAggregate.list", { page: 1, pageSize: 2, sort: "country" }),
			await broker.call("profileSummaryAggregate.list", { page: 2, pageSize: 2, sort: "country" }),
		],
		invalid: await failure("profileSummaryAggregate.find", { colour: "red" }),
		missing: await failure("profileSummaryAggregate.get", { id: 999_999 }),
		count: await broker.call("profileSummaryAggregate.count", {}),
	};
	// Safe to retry: a repeat with the same key is answered the stored event; key order in the
	// params does not matter; other params under the same key are a 409.
	const meta = { idempotencyKey: "js-order-1" };
	report.keyed = {
		first: await broker.call("profile.update", { name: "js-keyed", country: "NZ" }, { meta }),
		again: await broker.call("profile.update", { country: "NZ", name: "js-keyed" }, { meta }),
		conflict: await failure("profile.update", { name: "other", country: "NZ" }, { meta }),
	};
	say({ report });

	await expect("stop");
	await broker.stop();
	stdin.close();
}

main().catch(async (error) => {
	say({ error: String(error?.stack ?? error) });
	await broker.stop().catch(() => {});
	process.exit(1);
});
