// Fixture generator: real sigstore-js signing code, fully offline.
//
//   node generate.mjs OUTDIR ARTIFACT OTHER_ARTIFACT
//
// Fulcio, the CT log and Rekor are the in-process @sigstore/mock services (nock intercepts the
// HTTPS requests, nothing leaves the process). Their keys are generated here and written as
// trusted_root.json. Every bundle is produced by @sigstore/sign; the few files that are derived
// afterwards say exactly what was changed (see `derive*` below). manifest.json lists them all.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

import {
  FulcioSigner, MessageSignatureBundleBuilder, DSSEBundleBuilder, RekorWitness,
} from '@sigstore/sign';
import { bundleToJSON, toMessageSignatureBundle } from '@sigstore/bundle';
import { TrustedRoot } from '@sigstore/protobuf-specs';
import {
  initializeCA, initializeCTLog, initializeTLog, fulcioHandler, rekorHandler,
} from '@sigstore/mock';

// mock() (nock registration of one handler) is not re-exported by the package index.
const require = createRequire(import.meta.url);
const { mock } = require('@sigstore/mock/dist/mock.js');

const [outDir, artifactPath, otherPath] = process.argv.slice(2);
if (!outDir || !artifactPath || !otherPath) {
  console.error('usage: node generate.mjs OUTDIR ARTIFACT OTHER_ARTIFACT');
  process.exit(2);
}
fs.mkdirSync(outDir, { recursive: true });
const artifact = fs.readFileSync(artifactPath);
const other = fs.readFileSync(otherPath);

const FULCIO_URL = 'https://fulcio.mock.invalid';
const REKOR_URL = 'https://rekor.mock.invalid';
const IDENTITY = 'https://github.com/execguard/hello/.github/workflows/release.yml@refs/tags/v1.0.0';
const ISSUER = 'https://token.actions.githubusercontent.com';
const MINUTE = 60 * 1000;

// The mock CA takes its root's notBefore from the wall clock; pin the leaf a few seconds later
// so every signing time is inside the root's validity.
const T0 = Date.now() + 3000;

// One independent set of mock services: CA (+ its CT log) and a Rekor v1 log.
async function services({ caClock, logClock }) {
  const caKey = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const ctKey = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const logKey = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const ctlog = await initializeCTLog(ctKey, caClock);
  const ca = await initializeCA(caKey, ctlog, caClock);
  const tlog = await initializeTLog(REKOR_URL, logKey, logClock);
  const raw = fulcioHandler(ca);
  return { ca, ctlog, tlog, fulcio: realFulcioPEM(raw), fulcioRaw: raw, rekor: rekorHandler(tlog) };
}

// The mock Fulcio returns each PEM certificate as one long base64 line; the real Fulcio (Go's
// pem.Encode) wraps at 64 columns. The client copies that text into the Rekor entry body, so
// we re-wrap the mock's *response* to look like real Fulcio. keyless-v0.2-pem-oneline.json keeps
// the mock's one-line form (valid too: verifiers must compare DER, not PEM text).
function realFulcioPEM(handler) {
  const wrap = (pem) => {
    const b64 = pem.replace(/-----[A-Z ]+-----|\s/g, '');
    return `-----BEGIN CERTIFICATE-----\n${b64.match(/.{1,64}/g).join('\n')}\n-----END CERTIFICATE-----\n`;
  };
  return {
    path: handler.path,
    fn: async (body) => {
      const res = await handler.fn(body);
      if (res.statusCode !== 201) return res;
      const json = JSON.parse(res.response);
      const chain = json.signedCertificateEmbeddedSct.chain;
      chain.certificates = chain.certificates.map(wrap);
      return { ...res, response: JSON.stringify(json) };
    },
  };
}

function trustedRoot(svc) {
  const start = new Date(T0 - 24 * 60 * MINUTE);
  const key = (raw) => ({
    rawBytes: raw, keyDetails: 5 /* PKIX_ECDSA_P256_SHA_256 */, validFor: { start },
  });
  const root = {
    mediaType: 'application/vnd.dev.sigstore.trustedroot+json;version=0.1',
    tlogs: [{
      baseUrl: REKOR_URL, hashAlgorithm: 1 /* SHA2_256 */, publicKey: key(svc.tlog.publicKey),
      logId: { keyId: crypto.createHash('sha256').update(svc.tlog.publicKey).digest() },
    }],
    certificateAuthorities: [{
      subject: { organization: 'sigstore.mock', commonName: 'sigstore' },
      uri: FULCIO_URL,
      certChain: { certificates: [{ rawBytes: svc.ca.rootCertificate }] },
      validFor: { start },
    }],
    ctlogs: [{
      baseUrl: 'https://ctfe.mock.invalid', hashAlgorithm: 1, publicKey: key(svc.ctlog.publicKey),
      logId: { keyId: Buffer.from(svc.ctlog.logID) },
    }],
    timestampAuthorities: [],
  };
  return TrustedRoot.toJSON(TrustedRoot.fromJSON(TrustedRoot.toJSON(root)));
}

// An unsigned JWT: the mock Fulcio decodes the claims without checking a signature.
function identityToken(sub, claims = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'none' })}.${b64({ iss: ISSUER, sub, aud: 'sigstore', ...claims })}.`;
}

// The claims a GitHub Actions OIDC token carries (values invented, names real); the mock
// Fulcio turns them into the certificate extensions 1.3.6.1.4.1.57264.1.2-1.6 and 1.9-1.22.
const WORKFLOW = 'execguard/hello/.github/workflows/release.yml@refs/tags/v1.0.0';
const GITHUB_CLAIMS = {
  repository: 'execguard/hello', repository_id: '123456', repository_owner: 'execguard',
  repository_owner_id: '654321', repository_visibility: 'public', ref: 'refs/tags/v1.0.0',
  sha: '0123456789abcdef0123456789abcdef01234567', event_name: 'push', workflow: 'release',
  job_workflow_ref: WORKFLOW, job_workflow_sha: '0123456789abcdef0123456789abcdef01234567',
  workflow_ref: WORKFLOW, workflow_sha: '0123456789abcdef0123456789abcdef01234567',
  runner_environment: 'github-hosted', run_id: '42', run_attempt: '1',
};

// nock interceptors fire once: register a fresh pair for every bundle.
function arm(svc, { onelinePEM = false } = {}) {
  mock(FULCIO_URL, onelinePEM ? svc.fulcioRaw : svc.fulcio);
  mock(REKOR_URL, svc.rekor);
}

function keylessSigner(sub = IDENTITY, claims = {}) {
  return new FulcioSigner({
    fulcioBaseURL: FULCIO_URL,
    identityProvider: { getToken: async () => identityToken(sub, claims) },
  });
}

function rekor() {
  return new RekorWitness({ rekorBaseURL: REKOR_URL, retry: false, timeout: 5000 });
}

// sign 4.1.1's MessageSignatureBundleBuilder always asks @sigstore/bundle for the v0.2 shape
// (x509CertificateChain). This subclass asks the same library function for the v0.3 shape
// (single `certificate`, media type application/vnd.dev.sigstore.bundle.v0.3+json).
class V03MessageBuilder extends MessageSignatureBundleBuilder {
  async package(art, sig) {
    return toMessageSignatureBundle({
      digest: crypto.createHash('sha256').update(art.data).digest(),
      signature: sig.signature,
      certificate: Buffer.from(sig.key.certificate.replace(/-----[A-Z ]+-----|\s/g, ''), 'base64'),
      certificateChain: false,
    });
  }
}

// A managed key held here: the Signer returns the public key and its hint (b64 sha256 SPKI).
function managedSigner(keyPair) {
  const spki = keyPair.publicKey.export({ format: 'der', type: 'spki' });
  const hint = crypto.createHash('sha256').update(spki).digest('base64');
  const pem = keyPair.publicKey.export({ format: 'pem', type: 'spki' }).toString();
  return {
    pem,
    hint,
    signer: {
      sign: async (data) => ({
        signature: crypto.sign('sha256', data, keyPair.privateKey),
        key: { $case: 'publicKey', publicKey: pem, hint },
      }),
    },
  };
}

const manifest = {
  identity: IDENTITY, issuer: ISSUER, github_claims: GITHUB_CLAIMS, generator: {}, files: {},
};
function write(name, obj, what) {
  fs.writeFileSync(path.join(outDir, name), typeof obj === 'string' ? obj : JSON.stringify(obj, null, 2));
  manifest.files[name] = what;
}

// -- good services, and the bundles they witness -----------------------------------------------
const good = await services({ caClock: new Date(T0), logClock: new Date(T0 + 5000) });
write('trusted_root.json', trustedRoot(good), 'trust root of the mock CA, CT log and Rekor');

arm(good);
const v02 = bundleToJSON(await new MessageSignatureBundleBuilder({
  signer: keylessSigner(), witnesses: [rekor()],
}).create({ data: artifact }));
write('keyless-v0.2.json', v02, 'keyless, as emitted by sign 4.1.1 (x509CertificateChain, SET + proof)');

// v0.1 is not emitted by sign 4.x. Derived from the v0.2 bundle above by changing ONLY the
// mediaType: a v0.2 bundle (chain + SET + inclusion proof) is also a valid v0.1 bundle.
const v01 = { ...structuredClone(v02), mediaType: 'application/vnd.dev.sigstore.bundle+json;version=0.1' };
write('keyless-v0.1.json', v01, 'v0.2 bundle re-labelled v0.1 (mediaType changed only)');

// The older v0.1 form with a SET and no inclusion proof: the v0.1 bundle above with
// tlogEntries[0].inclusionProof deleted. Everything left is the client's own output.
const v01set = structuredClone(v01);
delete v01set.verificationMaterial.tlogEntries[0].inclusionProof;
write('keyless-v0.1-set-only.json', v01set, 'v0.1 bundle with inclusionProof deleted (SET only)');

arm(good);
const v03 = bundleToJSON(await new V03MessageBuilder({
  signer: keylessSigner(), witnesses: [rekor()],
}).create({ data: artifact }));
write('keyless-v0.3.json', v03, 'keyless v0.3 (single certificate) from @sigstore/bundle');

arm(good);
const dsse = bundleToJSON(await new DSSEBundleBuilder({
  signer: keylessSigner(), witnesses: [new RekorWitness({ rekorBaseURL: REKOR_URL, entryType: 'dsse' })],
}).create({ data: Buffer.from(JSON.stringify({
  _type: 'https://in-toto.io/Statement/v1',
  subject: [{ name: 'hello', digest: { sha256: crypto.createHash('sha256').update(artifact).digest('hex') } }],
  predicateType: 'https://example.invalid/none', predicate: {},
})), type: 'application/vnd.in-toto+json' }));
write('keyless-dsse-v0.3.json', dsse, 'keyless DSSE (in-toto statement over the artifact)');

arm(good, { onelinePEM: true });
const oneline = bundleToJSON(await new MessageSignatureBundleBuilder({
  signer: keylessSigner(), witnesses: [rekor()],
}).create({ data: artifact }));
write('keyless-v0.2-pem-oneline.json', oneline, 'keyless v0.2, Rekor body PEM unwrapped (mock Fulcio as is)');

arm(good);
const otherBundle = bundleToJSON(await new MessageSignatureBundleBuilder({
  signer: keylessSigner(), witnesses: [rekor()],
}).create({ data: other }));
write('keyless-other-artifact.json', otherBundle, 'keyless v0.2 bundle over OTHER_ARTIFACT');

// A certificate carrying GitHub Actions claims as Fulcio extensions (the policy matches them).
arm(good);
const github = bundleToJSON(await new MessageSignatureBundleBuilder({
  signer: keylessSigner(IDENTITY, GITHUB_CLAIMS), witnesses: [rekor()],
}).create({ data: artifact }));
write('keyless-github.json', github, 'keyless v0.2, token with GitHub Actions claims (extensions)');
const githubSet = { ...structuredClone(github),
  mediaType: 'application/vnd.dev.sigstore.bundle+json;version=0.1' };
delete githubSet.verificationMaterial.tlogEntries[0].inclusionProof;
write('keyless-github-set-only.json', githubSet,
  'keyless-github.json re-labelled v0.1 with inclusionProof deleted (SET only)');
arm(good);
const githubOther = bundleToJSON(await new MessageSignatureBundleBuilder({
  signer: keylessSigner(IDENTITY, GITHUB_CLAIMS), witnesses: [rekor()],
}).create({ data: other }));
write('keyless-github-other.json', githubOther, 'as keyless-github.json, over OTHER_ARTIFACT');

// -- a managed key: with a Rekor entry, and without any tlog ----------------------------------
const managed = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
const m = managedSigner(managed);
write('managed.pub', m.pem, 'managed P-256 public key');
arm(good);
const keyTlog = bundleToJSON(await new MessageSignatureBundleBuilder({
  signer: m.signer, witnesses: [rekor()],
}).create({ data: artifact }));
write('key-v0.2.json', keyTlog, 'managed-key bundle with a Rekor entry (SET + proof)');
const keyNoTlog = bundleToJSON(await new MessageSignatureBundleBuilder({
  signer: m.signer, witnesses: [],
}).create({ data: artifact }));
write('key-notlog-v0.2.json', keyNoTlog, 'managed-key bundle without tlog entries');

const stranger = managedSigner(crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }));
write('stranger.pub', stranger.pem, 'a second, untrusted managed key');
const strangerBundle = bundleToJSON(await new MessageSignatureBundleBuilder({
  signer: stranger.signer, witnesses: [],
}).create({ data: artifact }));
write('key-stranger-v0.2.json', strangerBundle, 'managed-key bundle by the untrusted key');

// -- negative controls from their own services -------------------------------------------------
// Rekor integrates the entry 20 minutes after the 10-minute Fulcio certificate was issued:
// a genuinely generated "certificate expired at signing time" bundle (SET and proof are valid).
const late = await services({ caClock: new Date(T0), logClock: new Date(T0 + 20 * MINUTE) });
write('late_trusted_root.json', trustedRoot(late), 'trust root for keyless-expired.json');
arm(late);
const expired = bundleToJSON(await new MessageSignatureBundleBuilder({
  signer: keylessSigner(), witnesses: [rekor()],
}).create({ data: artifact }));
write('keyless-expired.json', expired, 'integratedTime 20 min after cert issue (cert expired)');

const stray = await services({ caClock: new Date(T0), logClock: new Date(T0 + 5000) });
write('other_trusted_root.json', trustedRoot(stray), 'an unrelated trust root (untrusted-root control)');

// nock patches node:http; anything that did not reach a mock would have thrown above.
manifest.generator = {
  node: process.version,
  packages: Object.fromEntries(['sigstore', '@sigstore/sign', '@sigstore/bundle', '@sigstore/verify',
    '@sigstore/mock', '@sigstore/protobuf-specs'].map((p) => [p, JSON.parse(fs.readFileSync(
    new URL(`./node_modules/${p}/package.json`, import.meta.url))).version])),
};
write('manifest.json', manifest, 'this file');
