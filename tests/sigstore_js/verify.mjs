// Cross-check with an independent verifier: @sigstore/verify, fully offline.
//
//   node verify.mjs TRUSTED_ROOT BUNDLE ARTIFACT [PUBLIC_KEY_PEM]
//
// With a public key the bundle is a managed-key bundle: the key is offered for any hint and
// no log entry or timestamp is required (thresholds 0), as for `execguard sign --bundle`.
// Exit 0 and one JSON line on success; exit 1 with the error message otherwise.
import crypto from 'node:crypto';
import fs from 'node:fs';

import { bundleFromJSON } from '@sigstore/bundle';
import { TrustedRoot } from '@sigstore/protobuf-specs';
import { Verifier, toSignedEntity, toTrustMaterial } from '@sigstore/verify';

const [rootPath, bundlePath, artifactPath, keyPath] = process.argv.slice(2);
try {
  const root = TrustedRoot.fromJSON(JSON.parse(fs.readFileSync(rootPath, 'utf8')));
  const bundle = bundleFromJSON(JSON.parse(fs.readFileSync(bundlePath, 'utf8')));
  const keyFinder = keyPath
    ? () => ({ publicKey: crypto.createPublicKey(fs.readFileSync(keyPath)), validFor: () => true })
    : undefined;
  const options = keyPath ? { tlogThreshold: 0, ctlogThreshold: 0, timestampThreshold: 0 } : {};
  const verifier = new Verifier(toTrustMaterial(root, keyFinder), options);
  const signer = verifier.verify(toSignedEntity(bundle, fs.readFileSync(artifactPath)));
  console.log(JSON.stringify({ ok: true, mediaType: bundle.mediaType, san: signer.identity?.subjectAlternativeName ?? null }));
} catch (err) {
  console.error(`${err.name}: ${err.message}`);
  process.exit(1);
}
