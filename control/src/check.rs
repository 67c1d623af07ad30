//! Verifying a peer list, with explanations for operators.
//!
//! [`verify`] runs [`PeerList::verify`] (signatures and threshold, network
//! parameters, validity window, no rollback) and, on success, summarizes what was
//! checked ([`Verified`]); on failure it adds what an operator needs to act
//! ([`VerifyError`]: when it expired, who signed, ...). [`check_signatures`] checks
//! every signature against its own signer key, trusted or not, for display.
//!
//! Time is an argument (`now`, Unix seconds); nothing here reads the clock.

use std::collections::BTreeSet;
use std::fmt;

use shroud_proto::keys::IdentityPublic;
use shroud_proto::peerlist::{PeerList, PeerListError, TrustPolicy, SIGNATURE_CONTEXT};

use crate::exit;
use crate::time::{format_date, format_relative, format_span};

/// What a successful [`verify`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The list's serial.
    pub serial: u64,
    /// Distinct trusted authorities whose signatures verified, sorted.
    pub trusted_signers: Vec<IdentityPublic>,
    /// Signatures by keys outside the trust policy (ignored).
    pub untrusted_signatures: usize,
    /// Distinct trusted authorities in the policy.
    pub authorities: usize,
    /// The policy's threshold.
    pub threshold: usize,
    /// Number of relays listed.
    pub relays: usize,
    /// End of validity (exclusive), Unix seconds.
    pub valid_until: u64,
    /// The time the check was made for.
    pub now: u64,
}

impl fmt::Display for Verified {
    /// One line: `OK: serial 42, signed by 2 of 3 trusted authorities (threshold 2),
    /// 3 relays, expires in 11h 59m (2025-11-25T16:00:00Z)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "OK: serial {}, signed by {} of {} trusted authorities (threshold {})",
            self.serial,
            self.trusted_signers.len(),
            self.authorities,
            self.threshold
        )?;
        if self.untrusted_signatures > 0 {
            write!(
                f,
                " and {} untrusted key(s) (ignored)",
                self.untrusted_signatures
            )?;
        }
        write!(
            f,
            ", {} relay{}, expires {} ({})",
            self.relays,
            if self.relays == 1 { "" } else { "s" },
            format_relative(self.valid_until, self.now),
            format_date(self.valid_until)
        )
    }
}

/// A failed [`verify`]: the protocol's error and, where useful, an explanation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}{}", detail.as_ref().map(|d| format!("; {d}")).unwrap_or_default())]
pub struct VerifyError {
    /// What `shroud-proto` refused.
    pub error: PeerListError,
    /// Context for the operator (dates, signers, what to do).
    pub detail: Option<String>,
}

impl VerifyError {
    /// [`exit::FAILURE`] for a list that is well-formed but not acceptable (the
    /// usual case), [`exit::CONFIG`] for a list that breaks the format's invariants,
    /// [`exit::USAGE`] for an unusable trust policy.
    pub fn exit_code(&self) -> u8 {
        match self.error {
            PeerListError::TooLarge { .. }
            | PeerListError::TooManyRelays { .. }
            | PeerListError::Malformed { .. }
            | PeerListError::Duplicate { .. }
            | PeerListError::UnsupportedVersion { .. } => exit::CONFIG,
            PeerListError::InvalidPolicy { .. } => exit::USAGE,
            _ => exit::FAILURE,
        }
    }

    /// The `shroud-proto` error kind (`expired`, `forged`, `rollback`, ...).
    pub fn kind(&self) -> &'static str {
        self.error.kind()
    }
}

/// Verifies `list` for use at `now` under `policy`, refusing serials below
/// `last_serial` (see [`PeerList::verify`] for the exact rules and their order).
pub fn verify(
    list: &PeerList,
    policy: &TrustPolicy,
    now: u64,
    last_serial: Option<u64>,
) -> Result<Verified, VerifyError> {
    if let Err(error) = list.verify(policy, now, last_serial) {
        let detail = explain(list, policy, now, &error);
        return Err(VerifyError { error, detail });
    }
    let trusted: BTreeSet<IdentityPublic> = policy.authorities.iter().copied().collect();
    let trusted_signers: BTreeSet<IdentityPublic> = list
        .signatures
        .iter()
        .map(|s| s.signer)
        .filter(|s| trusted.contains(s))
        .collect();
    let untrusted_signatures = list
        .signatures
        .iter()
        .filter(|s| !trusted.contains(&s.signer))
        .count();
    Ok(Verified {
        serial: list.serial,
        trusted_signers: trusted_signers.into_iter().collect(),
        untrusted_signatures,
        authorities: trusted.len(),
        threshold: policy.threshold,
        relays: list.relays.len(),
        valid_until: list.valid_until,
        now,
    })
}

fn explain(
    list: &PeerList,
    policy: &TrustPolicy,
    now: u64,
    error: &PeerListError,
) -> Option<String> {
    match error {
        PeerListError::Unsigned => {
            Some("an authority must sign it first: `shroudctl peers sign FILE --key KEY`".into())
        }
        PeerListError::Forged { signer } => Some(format!(
            "signer relay id {}; do not use this file: fetch the list again from its source",
            signer.relay_id()
        )),
        PeerListError::UnderThreshold { .. } => {
            let checks = check_signatures(list);
            let trusted: Vec<String> = checks
                .iter()
                .filter(|c| c.valid && policy.authorities.contains(&c.signer))
                .map(|c| c.signer.to_string())
                .collect();
            let untrusted = checks
                .iter()
                .filter(|c| !policy.authorities.contains(&c.signer))
                .count();
            let mut d = if trusted.is_empty() {
                "no trusted authority signed it".to_owned()
            } else {
                format!("signed by trusted {}", trusted.join(", "))
            };
            if untrusted > 0 {
                d.push_str(&format!(
                    "; {untrusted} signature(s) by keys outside the trust policy were ignored"
                ));
            }
            Some(d)
        }
        PeerListError::Expired { until, .. } => Some(format!(
            "expired {} ago, at {}",
            format_span(now.saturating_sub(*until)),
            format_date(*until)
        )),
        PeerListError::NotYetValid { after, .. } => Some(format!(
            "becomes valid {}, at {}; check this machine's clock",
            format_relative(*after, now),
            format_date(*after)
        )),
        PeerListError::Rollback { .. } => {
            Some("an older list than one already accepted: a replay or a stale mirror".to_owned())
        }
        _ => None,
    }
}

/// One signature of a list, checked against its own signer's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureCheck {
    /// The signing key.
    pub signer: IdentityPublic,
    /// Whether the signature verifies over the list's current body.
    pub valid: bool,
}

/// Checks every signature of `list` over its body, whoever the signer is. This says
/// nothing about trust; [`verify`] decides acceptance.
pub fn check_signatures(list: &PeerList) -> Vec<SignatureCheck> {
    let mut msg = SIGNATURE_CONTEXT.to_vec();
    msg.extend_from_slice(&list.body_bytes());
    list.signatures
        .iter()
        .map(|s| SignatureCheck {
            signer: s.signer,
            valid: s.signer.verify(&msg, &s.sig).is_ok(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shroud_proto::keys::IdentityKey;
    use shroud_proto::peerlist::NetworkParams;

    fn keys() -> [IdentityKey; 3] {
        [1, 2, 3].map(|s| IdentityKey::from_bytes(&[s; 32]))
    }

    #[test]
    fn summary_and_explanations() {
        let [a, b, c] = keys();
        let mut list = PeerList::new(7, 1_000, 90_000, NetworkParams::default());
        list.sign(&a).expect("sign");
        list.sign(&c).expect("sign");
        let policy = TrustPolicy::new(vec![a.public(), b.public()], 1);
        let ok = verify(&list, &policy, 1_000, Some(7)).expect("ok");
        assert_eq!(ok.trusted_signers, vec![a.public()]);
        assert_eq!(ok.untrusted_signatures, 1);
        let line = ok.to_string();
        assert!(
            line.starts_with("OK: serial 7, signed by 1 of 2 trusted"),
            "{line}"
        );
        assert!(
            line.contains("0 relays, expires in 1d (1970-01-02T01:00:00Z)"),
            "{line}"
        );

        let e = verify(&list, &policy, 90_000 + 3_600, None).expect_err("expired");
        assert_eq!(e.kind(), "expired");
        assert_eq!(e.exit_code(), exit::FAILURE);
        assert!(e.to_string().contains("expired 1h ago"), "{e}");
        let e = verify(&list, &policy, 1_000, Some(8)).expect_err("rollback");
        assert_eq!(e.kind(), "rollback");
        let strict = TrustPolicy::new(vec![a.public(), b.public()], 2);
        let e = verify(&list, &strict, 1_000, None).expect_err("threshold");
        assert!(e.to_string().contains("outside the trust policy"), "{e}");
    }

    #[test]
    fn signature_checks_see_tampering() {
        let [a, b, _] = keys();
        let mut list = PeerList::new(7, 1_000, 90_000, NetworkParams::default());
        list.sign(&a).expect("sign");
        list.sign(&b).expect("sign");
        assert!(check_signatures(&list).iter().all(|c| c.valid));
        list.valid_until += 1;
        assert!(check_signatures(&list).iter().all(|c| !c.valid));
    }
}
