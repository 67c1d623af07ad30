//! QUIC's TLS: the gateway's self-signed certificate, pinned by the proxy, and the
//! QUIC transport settings both ends share.
//!
//! The circuit already encrypts and authenticates everything between the client and
//! the exit (one AES-GCM layer per hop, the exit's layer keyed by a handshake with
//! its onion key). TLS adds the stretch from the exit to the gateway (a separate
//! host, or the exit's own loopback) and binds the stream to one gateway: the proxy
//! accepts exactly the certificate whose SHA-256 it is configured with
//! ([`PinnedCert`]), no CA, no name check. The gateway's handshake signature is still
//! verified against that certificate's key, so only the holder of the key passes.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// ALPN of the stream protocol.
pub const ALPN: &[u8] = b"shroud-stream/1";
/// The server name the proxy sends (not checked: the certificate is pinned).
pub const SERVER_NAME: &str = "shroud-gateway";

/// A new self-signed certificate and its PKCS#8 key, both DER.
pub fn generate_cert() -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
    Ok((ck.cert.der().to_vec(), ck.key_pair.serialize_der()))
}

/// Lowercase hex SHA-256 of a DER certificate: what the proxy pins.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly one certificate, by SHA-256.
#[derive(Debug)]
pub struct PinnedCert {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Parses a pinned fingerprint: 64 hex digits (colons allowed between bytes).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    let v = hex::decode(clean.to_ascii_lowercase()).map_err(|e| format!("not hexadecimal: {e}"))?;
    v.try_into()
        .map_err(|v: Vec<u8>| format!("{} bytes, a SHA-256 has 32", v.len()))
}

/// QUIC transport settings for a path whose datagrams are at most `max_packet`
/// bytes: no path MTU discovery (the size is fixed by the fragment format), keep-alive
/// and idle timeout so a dead circuit is noticed within `idle`, BBR congestion control.
pub fn transport(max_packet: u16, idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.initial_mtu(max_packet)
        .min_mtu(max_packet)
        .mtu_discovery_config(None)
        .keep_alive_interval(Some(idle / 4))
        .max_concurrent_bidi_streams(1024u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((8u32 << 20).into())
        .receive_window((32u32 << 20).into())
        .send_window(32 << 20);
    if let Ok(i) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(i));
    }
    // BBR rather than quinn's default Cubic: a circuit is a path of several processes
    // with large socket buffers (the proxy's circuit socket holds ~4,000 cells), which
    // a loss-based controller fills: measured with Cubic, a 30 MB stream ran at the
    // same ~9 MB/s but with a 200 ms round trip and 2,400 packets lost in slow start;
    // with BBR, 4.6 ms and none lost (docs/BENCHMARKING.md, 2026-12-04).
    t.congestion_controller_factory(std::sync::Arc::new(quinn::congestion::BbrConfig::default()));
    t
}

/// The proxy's QUIC client configuration, pinning `sha256`.
pub fn client_config(
    sha256: [u8; 32],
    max_packet: u16,
    idle: Duration,
) -> anyhow::Result<quinn::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert { sha256, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(Arc::new(transport(max_packet, idle)));
    Ok(c)
}

/// The gateway's QUIC server configuration.
pub fn server_config(
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    max_packet: u16,
    idle: Duration,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut s = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    s.transport_config(Arc::new(transport(max_packet, idle)));
    Ok(s)
}

/// Endpoint settings for `max_packet`-byte datagrams.
pub fn endpoint_config(max_packet: u16) -> quinn::EndpointConfig {
    let mut e = quinn::EndpointConfig::default();
    // Both values are at least 1200 (checked by the callers' max_packet).
    let _ = e.max_udp_payload_size(max_packet);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let (cert, _) = generate_cert().unwrap();
        let f = fingerprint(&cert);
        assert_eq!(f.len(), 64);
        let bytes = parse_fingerprint(&f).unwrap();
        let with_colons: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&with_colons.join(":")).unwrap(), bytes);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn only_the_pinned_certificate_passes() {
        let (cert, _) = generate_cert().unwrap();
        let (other, _) = generate_cert().unwrap();
        let v = PinnedCert {
            sha256: parse_fingerprint(&fingerprint(&cert)).unwrap(),
            provider: provider(),
        };
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let now = UnixTime::now();
        assert!(v
            .verify_server_cert(&CertificateDer::from(cert), &[], &name, &[], now)
            .is_ok());
        assert!(v
            .verify_server_cert(&CertificateDer::from(other), &[], &name, &[], now)
            .is_err());
    }
}
