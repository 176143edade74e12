//! Secrets at rest: the server key and what it seals (users' SSH private keys).
//!
//! Sealing is ChaCha20-Poly1305 (`ring`) with a random 96-bit nonce per seal; the
//! additional data names what was sealed (`credential:<user>:<cluster>`), so a sealed
//! key moved to another user's row fails to open. Opened secrets are wiped from
//! memory when dropped.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// The server key (32 bytes). `Debug` never shows it.
pub struct ServerKey {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerKey([redacted])")
    }
}

/// Why a sealed secret could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("the secret cannot be opened: it was sealed with another server key, for something else, or has been altered")]
pub struct OpenError;

impl ServerKey {
    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(bytes.len() == 32, "a server key is 32 bytes, not {}", bytes.len());
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| anyhow::anyhow!("bad server key"))?;
        Ok(Self { key: LessSafeKey::new(unbound), rng: SystemRandom::new() })
    }

    /// Reads the key file (base64 of 32 bytes), creating it with a fresh random key
    /// (mode 0600) if it does not exist. Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> anyhow::Result<(Self, bool)> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = Zeroizing::new(
                    base64::engine::general_purpose::STANDARD
                        .decode(text.trim())
                        .with_context(|| format!("{} does not hold a base64 server key", path.display()))?,
                );
                Ok((Self::from_bytes(&bytes).with_context(|| format!("in {}", path.display()))?, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = Zeroizing::new([0u8; 32]);
                SystemRandom::new()
                    .fill(bytes.as_mut())
                    .map_err(|_| anyhow::anyhow!("no randomness for a server key"))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f =
                    opts.open(path).with_context(|| format!("creating the server key file {}", path.display()))?;
                let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes.as_ref()));
                writeln!(f, "{}", encoded.as_str()).with_context(|| format!("writing {}", path.display()))?;
                f.sync_all()?;
                Ok((Self::from_bytes(bytes.as_ref())?, true))
            }
            Err(e) => Err(e).with_context(|| format!("reading the server key file {}", path.display())),
        }
    }

    /// Seals `plaintext` for `purpose`: nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("the system random source works");
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + CHACHA20_POLY1305.tag_len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.as_bytes()),
                &mut out[NONCE_LEN..],
            )
            .expect("sealing a bounded buffer succeeds");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Opens what [`ServerKey::seal`] made for the same `purpose`.
    pub fn open(&self, purpose: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(OpenError);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
        let mut buf = Zeroizing::new(rest.to_vec());
        let plain_len = self
            .key
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), buf.as_mut_slice())
            .map_err(|_| OpenError)?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }
}

/// The purpose string sealed keys are bound to.
pub fn credential_purpose(user: &str, cluster: &str) -> String {
    format!("hpcforge-credential:{user}:{cluster}")
}

/// An SSH private key as registered: type and fingerprint, from the OpenSSH text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFacts {
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`, ...
    pub key_type: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

/// Checks an OpenSSH private key: it parses, and is not passphrase-protected (the
/// server could not use it unattended; it is encrypted at rest here instead).
pub fn inspect_private_key(text: &str) -> Result<KeyFacts, String> {
    let key = ssh_key::PrivateKey::from_openssh(text.trim()).map_err(|e| {
        format!("not an OpenSSH private key ({e}); give the file that starts with -----BEGIN OPENSSH PRIVATE KEY-----")
    })?;
    if key.is_encrypted() {
        return Err(
            "the key is protected by a passphrase; register an unprotected copy (hpcforge keeps it encrypted at rest)"
                .into(),
        );
    }
    let public = key.public_key();
    Ok(KeyFacts {
        key_type: public.algorithm().as_str().to_owned(),
        fingerprint: public.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServerKey {
        ServerKey::from_bytes(&[7u8; 32]).unwrap()
    }

    #[test]
    fn sealed_secrets_open_only_for_their_purpose_and_key() {
        let k = key();
        let sealed = k.seal("credential:alice:c", b"secret key text");
        assert_eq!(k.open("credential:alice:c", &sealed).unwrap().as_slice(), b"secret key text");
        assert!(k.open("credential:bob:c", &sealed).is_err(), "moved to another user's row");
        let other = ServerKey::from_bytes(&[8u8; 32]).unwrap();
        assert!(other.open("credential:alice:c", &sealed).is_err(), "another server key");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(k.open("credential:alice:c", &tampered).is_err());
        assert_ne!(k.seal("p", b"x"), k.seal("p", b"x"), "fresh nonce each time");
        assert!(!format!("{k:?}").contains('7'));
    }

    #[test]
    fn the_key_file_is_created_private_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret.key");
        let (a, created) = ServerKey::load_or_create(&path).unwrap();
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let (b, created) = ServerKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(b.open("p", &a.seal("p", b"same key")).unwrap().as_slice(), b"same key");
        std::fs::write(&path, "not base64!").unwrap();
        assert!(ServerKey::load_or_create(&path).is_err());
    }

    #[test]
    fn private_keys_are_read_for_type_and_fingerprint_and_refused_when_not_usable() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys");
        let read = |name: &str| std::fs::read_to_string(fixtures.join(name)).unwrap();
        let facts = inspect_private_key(&read("throwaway_ed25519")).unwrap();
        assert_eq!(facts.key_type, "ssh-ed25519");
        // The same fingerprint `ssh-keygen -lf` printed for it.
        assert_eq!(facts.fingerprint, read("throwaway_ed25519.fingerprint").trim());
        let err = inspect_private_key(&read("throwaway_ed25519_protected")).unwrap_err();
        assert!(err.contains("passphrase"), "{err}");
        assert!(inspect_private_key("ssh-ed25519 AAAA public key").unwrap_err().contains("not an OpenSSH private key"));
    }
}
