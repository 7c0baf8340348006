// GET each URL with Node's global fetch (undici), no TLS options: NODE_EXTRA_CA_CERTS only.
// usage: node fetch.js URL...   Prints one line per URL: STATUS - BODY.
(async () => {
  console.error(`client node ${process.version} undici ${process.versions.undici}`);
  for (const url of process.argv.slice(2)) {
    const r = await fetch(url, { signal: AbortSignal.timeout(20000) });
    console.log(`${r.status} - ${(await r.text()).trim()}`);
  }
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
