//! A connection to a server with an agreed session key: register (new identity) or
//! reconnect (saved identity), exactly as PROTOCOL.md says.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use cyberbackup_protocol::v3::crypto::{AesKey, ClientKeypair};
use cyberbackup_protocol::v3::header::{RequestCode, ResponseHeader, RESPONSE_HEADER_LEN};
use cyberbackup_protocol::v3::message::{encode_name_request, encode_send_public_key, Response};
use cyberbackup_protocol::v3::{name, VERSION};

use crate::{ClientError, Identity};

/// Who connects.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// Register this user name as a new client.
    New(String),
    /// Reconnect with a saved identity; if the server does not know it, register its
    /// name anew (as the CyberBackup 3.0 client does).
    Existing(Box<Identity>),
}

/// Timeouts.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Time to establish the TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for any read or write.
    pub io_timeout: Duration,
    /// TCP congestion control for the connection (`TCP_CONGESTION`, e.g. "cubic"), or
    /// `None` for the system's default. The load generator uses it on loopback, where
    /// a pacing algorithm (BBR) bills the sender's transmissions to the server's CPU.
    pub congestion: Option<String>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            congestion: None,
        }
    }
}

/// A connection with a session key.
pub struct Session {
    pub(crate) stream: TcpStream,
    pub(crate) server: String,
    pub(crate) identity: Identity,
    pub(crate) key: AesKey,
    pub(crate) opts: ConnectOptions,
    /// Set after an error that may leave the stream out of step; the next upload
    /// reconnects first.
    pub(crate) broken: bool,
    /// Reusable request buffer.
    pub(crate) req: Vec<u8>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("server", &self.server)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

pub(crate) fn io_error(e: io::Error, timeout: Duration) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(timeout),
        _ => ClientError::ConnectionLost(e),
    }
}

fn resolve(server: &str) -> Result<Vec<SocketAddr>, ClientError> {
    let bad = || ClientError::BadAddress {
        server: server.to_owned(),
    };
    let (host, port) = server.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    server
        .to_socket_addrs()
        .map(|a| a.collect())
        .map_err(|source| ClientError::Unreachable {
            server: server.to_owned(),
            source,
        })
}

fn connect_tcp(server: &str, opts: &ConnectOptions) -> Result<TcpStream, ClientError> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in resolve(server)? {
        let connected = match &opts.congestion {
            None => TcpStream::connect_timeout(&addr, opts.connect_timeout),
            Some(name) => connect_with_congestion(&addr, name, opts.connect_timeout)?,
        };
        match connected {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(opts.io_timeout))
                    .and_then(|_| s.set_write_timeout(Some(opts.io_timeout)))
                    .map_err(ClientError::ConnectionLost)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(ClientError::Unreachable {
        server: server.to_owned(),
        source: last,
    })
}

/// Connects with TCP congestion control `name`, set before the SYN: an algorithm
/// switched after the handshake keeps what the default one set up (BBR turns on the
/// kernel's pacing, and it stays on). The outer error is the option's, the inner one
/// the connection's.
fn connect_with_congestion(
    addr: &std::net::SocketAddr,
    name: &str,
    timeout: Duration,
) -> Result<io::Result<TcpStream>, ClientError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sk = match Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    ) {
        Ok(sk) => sk,
        Err(e) => return Ok(Err(e)),
    };
    sk.set_tcp_congestion(name.as_bytes())
        .map_err(|source| ClientError::Congestion {
            name: name.to_owned(),
            source,
        })?;
    Ok(sk
        .connect_timeout(&(*addr).into(), timeout)
        .map(|()| TcpStream::from(sk)))
}

/// Checks that TCP congestion control `name` can be set on this host, as
/// [`ConnectOptions::congestion`] will, without connecting anywhere.
pub fn check_congestion(name: &str) -> Result<(), ClientError> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(
        |source| ClientError::Congestion {
            name: name.to_owned(),
            source,
        },
    )?;
    s.set_tcp_congestion(name.as_bytes())
        .map_err(|source| ClientError::Congestion {
            name: name.to_owned(),
            source,
        })
}

/// Reads one response, bounded: nothing larger than a v3 response is read.
pub(crate) fn read_response(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let mut h = [0u8; RESPONSE_HEADER_LEN];
    stream
        .read_exact(&mut h)
        .map_err(|e| io_error(e, timeout))?;
    let h = ResponseHeader::parse(&h).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if h.version != VERSION {
        return Err(ClientError::Protocol(format!(
            "response version {}",
            h.version
        )));
    }
    let max =
        Response::MAX_PAYLOAD.max(cyberbackup_protocol::v3::message::FILE_RECEIVED_LEN as u32);
    if h.payload_size > max {
        return Err(ClientError::Protocol(format!(
            "response payload of {} bytes (at most {max})",
            h.payload_size
        )));
    }
    let mut p = [0u8; 1024];
    let p = &mut p[..h.payload_size as usize];
    stream.read_exact(p).map_err(|e| io_error(e, timeout))?;
    Response::decode(h.code, p).map_err(|e| ClientError::Protocol(e.to_string()))
}

fn unexpected(what: &str, r: &Response) -> ClientError {
    ClientError::Protocol(format!(
        "unexpected answer {:?} to {what}",
        u16::from(r.code())
    ))
}

impl Session {
    /// Connects, then registers or reconnects. Returns the session and the identity in
    /// use: a new one if the client registered (save it), else the one given.
    pub fn open(
        server: &str,
        creds: Credentials,
        opts: &ConnectOptions,
    ) -> Result<(Session, Identity), ClientError> {
        Self::open_saving(server, creds, opts, &mut |_| Ok(()))
    }

    /// As [`open`](Self::open), calling `save` with a new identity as soon as the
    /// server has assigned its id (before the key exchange): a connection lost between
    /// the two no longer loses the registration, because a later open with that
    /// identity finishes it (the server accepts the key of a client that has none).
    pub fn open_saving(
        server: &str,
        creds: Credentials,
        opts: &ConnectOptions,
        save: &mut dyn FnMut(&Identity) -> Result<(), ClientError>,
    ) -> Result<(Session, Identity), ClientError> {
        match creds {
            Credentials::New(name) => {
                let keypair = ClientKeypair::generate(&mut rand::thread_rng())?;
                Self::register_inner(server, &name, keypair, opts, save)
            }
            Credentials::Existing(identity) => {
                let identity = *identity;
                let mut stream = connect_tcp(server, opts)?;
                if let Some(key) = Self::reconnect_on(&mut stream, &identity, opts)? {
                    return Ok((
                        Session::new(stream, server, identity.clone(), key, opts),
                        identity,
                    ));
                }
                drop(stream);
                // Perhaps a registration that lost its connection before the key
                // exchange: the server takes the key of a client that has none.
                if let Some(s) = Self::finish_registration(server, &identity, opts)? {
                    tracing::info!(name = %identity.name, "finished an interrupted registration");
                    return Ok((s, identity));
                }
                tracing::info!(name = %identity.name, "server does not know this identity; registering");
                let keypair = ClientKeypair::generate(&mut rand::thread_rng())?;
                Self::register_inner(server, &identity.name, keypair, opts, save)
            }
        }
    }

    /// SEND_PUBLIC_KEY for an identity whose registration did not finish.
    fn finish_registration(
        server: &str,
        identity: &Identity,
        opts: &ConnectOptions,
    ) -> Result<Option<Session>, ClientError> {
        let mut stream = connect_tcp(server, opts)?;
        let t = opts.io_timeout;
        let mut req = Vec::with_capacity(512);
        encode_send_public_key(
            &mut req,
            &identity.id,
            &identity.name,
            identity.keypair.public_der(),
        )
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream.write_all(&req).map_err(|e| io_error(e, t))?;
        match read_response(&mut stream, t) {
            Ok(Response::AesKey {
                client_id,
                encrypted_key,
            }) if client_id == identity.id => {
                let key = identity.keypair.decrypt_session_key(&encrypted_key)?;
                Ok(Some(Session::new(
                    stream,
                    server,
                    identity.clone(),
                    key,
                    opts,
                )))
            }
            // Refused (1607), or closed: not an interrupted registration.
            Ok(_) | Err(ClientError::ConnectionLost(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn new(
        stream: TcpStream,
        server: &str,
        identity: Identity,
        key: AesKey,
        opts: &ConnectOptions,
    ) -> Session {
        Session {
            stream,
            server: server.to_owned(),
            identity,
            key,
            opts: opts.clone(),
            broken: false,
            req: Vec::with_capacity(512),
        }
    }

    /// The identity this session uses.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The server address.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Registers `user` with a key pair made beforehand (a load generator reuses a pool
    /// of keys so that key generation stays out of what it measures).
    pub fn register_with_key(
        server: &str,
        user: &str,
        keypair: ClientKeypair,
        opts: &ConnectOptions,
    ) -> Result<(Session, Identity), ClientError> {
        Self::register_inner(server, user, keypair, opts, &mut |_| Ok(()))
    }

    fn register_inner(
        server: &str,
        user: &str,
        keypair: ClientKeypair,
        opts: &ConnectOptions,
        save: &mut dyn FnMut(&Identity) -> Result<(), ClientError>,
    ) -> Result<(Session, Identity), ClientError> {
        name::check_user_name(user.as_bytes()).map_err(|e| ClientError::BadInput {
            path: user.into(),
            reason: format!("not a valid user name: {e}"),
        })?;
        let mut stream = connect_tcp(server, opts)?;
        let t = opts.io_timeout;
        let mut req = Vec::with_capacity(512);
        encode_name_request(&mut req, &[0; 16], RequestCode::Register, user)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream.write_all(&req).map_err(|e| io_error(e, t))?;
        let id = match read_response(&mut stream, t)? {
            Response::RegisterOk { client_id } => client_id,
            Response::RegisterFailed => return Err(ClientError::NameTaken(user.to_owned())),
            Response::Error => return Err(ClientError::ServerError("registering")),
            r => return Err(unexpected("REGISTER", &r)),
        };
        let identity = Identity {
            name: user.to_owned(),
            id,
            keypair,
        };
        save(&identity)?;
        let keypair = &identity.keypair;
        req.clear();
        encode_send_public_key(&mut req, &id, user, keypair.public_der())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream.write_all(&req).map_err(|e| io_error(e, t))?;
        let encrypted = match read_response(&mut stream, t)? {
            Response::AesKey {
                client_id,
                encrypted_key,
            } if client_id == id => encrypted_key,
            Response::Error => return Err(ClientError::ServerError("sending the public key")),
            r => return Err(unexpected("SEND_PUBLIC_KEY", &r)),
        };
        let key = keypair.decrypt_session_key(&encrypted)?;
        Ok((
            Session::new(stream, server, identity.clone(), key, opts),
            identity,
        ))
    }

    /// RECONNECT on `stream`: the session key, or `None` if the server rejects us.
    fn reconnect_on(
        stream: &mut TcpStream,
        identity: &Identity,
        opts: &ConnectOptions,
    ) -> Result<Option<AesKey>, ClientError> {
        let t = opts.io_timeout;
        let mut req = Vec::with_capacity(512);
        encode_name_request(
            &mut req,
            &identity.id,
            RequestCode::Reconnect,
            &identity.name,
        )
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        stream.write_all(&req).map_err(|e| io_error(e, t))?;
        match read_response(stream, t)? {
            Response::ReconnectOk {
                client_id,
                encrypted_key,
            } if client_id == identity.id => {
                Ok(Some(identity.keypair.decrypt_session_key(&encrypted_key)?))
            }
            Response::ReconnectRejected { .. } => Ok(None),
            Response::Error => Err(ClientError::ServerError("reconnecting")),
            r => Err(unexpected("RECONNECT", &r)),
        }
    }

    /// Reconnects with `identity`, without falling back to a registration: a rejection
    /// is [`ClientError::Rejected`].
    pub fn open_existing(
        server: &str,
        identity: Identity,
        opts: &ConnectOptions,
    ) -> Result<Session, ClientError> {
        let mut stream = connect_tcp(server, opts)?;
        match Self::reconnect_on(&mut stream, &identity, opts)? {
            Some(key) => Ok(Session::new(stream, server, identity, key, opts)),
            None => Err(ClientError::Rejected(identity.name)),
        }
    }

    /// The session key this connection agreed on (to encrypt ahead of time).
    pub fn session_key(&self) -> &AesKey {
        &self.key
    }

    /// Replaces the connection with a new one (after a drop), reconnecting with this
    /// session's identity.
    pub fn reconnect(&mut self) -> Result<(), ClientError> {
        let mut stream = connect_tcp(&self.server, &self.opts)?;
        match Self::reconnect_on(&mut stream, &self.identity, &self.opts)? {
            Some(key) => {
                self.stream = stream;
                self.key = key;
                self.broken = false;
                Ok(())
            }
            None => Err(ClientError::Rejected(self.identity.name.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connects to a local listener with congestion control `cc`.
    fn connect_with(cc: &str) -> Result<TcpStream, ClientError> {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let opts = ConnectOptions {
            congestion: Some(cc.into()),
            ..ConnectOptions::default()
        };
        connect_tcp(&l.local_addr().unwrap().to_string(), &opts)
    }

    /// Reno is built into every Linux kernel, so these run anywhere.
    #[test]
    fn a_connection_gets_the_congestion_control_asked_for() {
        let s = connect_with("reno").unwrap();
        let cc = socket2::SockRef::from(&s).tcp_congestion().unwrap();
        // The kernel answers with a NUL-padded name.
        assert_eq!(cc.split(|&b| b == 0).next(), Some(&b"reno"[..]));
        check_congestion("reno").unwrap();
    }

    #[test]
    fn an_unknown_congestion_control_is_a_clear_error() {
        let e = connect_with("no-such-algorithm").unwrap_err();
        assert!(matches!(e, ClientError::Congestion { .. }), "{e:?}");
        assert!(e.report().contains("no-such-algorithm"), "{}", e.report());
        assert!(check_congestion("no-such-algorithm").is_err());
    }
}
