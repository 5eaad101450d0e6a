//! The v4 client session: the preamble, the handshake with the server-key check, and
//! request framing within the window, as a sans-IO state machine.
//!
//! Call order: [`ClientSession::new`] (the preamble and handshake message 1 are
//! then in [`ClientSession::output`]); write output and feed what the socket gives to
//! [`ClientSession::handle_input`]; take [`Event`]s from [`ClientSession::poll_event`].
//! On [`Event::ServerKey`] the caller checks the key against its pin and calls
//! [`ClientSession::accept_server`] (or drops the session: the device key is never sent
//! to a server that is not the pinned one). After [`Event::Welcome`], requests go out
//! with [`ClientSession::send`] while [`ClientSession::can_send`] allows, and each
//! comes back once as [`Event::Answer`] with its request id.

use std::collections::{HashMap, VecDeque};

use super::noise::{self, Handshake, MessageReader, NoiseError, StaticKey, Transport};
use super::wire::{
    self, max_answer_len, Answer, ErrorAnswer, FrameReader, Login, Request, ServerHello, Welcome,
    WireError, FRAME_HEADER_LEN,
};

/// Client-side errors: the connection cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Noise(#[from] NoiseError),
    #[error("the server sent a malformed message: {0}")]
    Wire(#[from] WireError),
    #[error("the server's handshake is malformed")]
    Handshake,
    #[error("the login was refused: {0}")]
    Refused(ErrorAnswer),
    #[error("the server closed the connection: {0}")]
    Closed(ErrorAnswer),
    #[error("an answer to request {0}, which is not outstanding")]
    UnexpectedAnswer(u32),
    #[error("not ready: {0}")]
    State(&'static str),
}

/// What happened.
#[derive(Debug)]
pub enum Event {
    /// Handshake message 2 arrived: check `key` against the pin, then
    /// [`ClientSession::accept_server`].
    ServerKey { key: [u8; 32], hello: ServerHello },
    /// Logged in.
    Welcome(Welcome),
    /// The answer to a request.
    Answer { request_id: u32, answer: Answer },
}

enum Phase {
    Message2(Handshake),
    /// Waiting for the caller to accept the server's key.
    Pin(Handshake),
    Welcome(Transport),
    Ready(Transport),
    Failed,
}

/// One v4 connection on the client.
pub struct ClientSession {
    phase: Phase,
    login: Login,
    hello: Option<ServerHello>,
    messages: MessageReader,
    frames: FrameReader,
    events: VecDeque<Event>,
    out: Vec<u8>,
    frame_buf: Vec<u8>,
    unanswered: HashMap<u32, u64>,
    weight: u64,
    next_id: u32,
    handshake_hash: [u8; 32],
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("unanswered", &self.unanswered.len())
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    /// Starts a connection as `device` with `login`.
    pub fn new(device: &StaticKey, login: Login) -> Result<Self, ClientError> {
        let mut hs = Handshake::initiator(device)?;
        let mut out = wire::preamble().to_vec();
        hs.write(&[], &mut out)?;
        Ok(ClientSession {
            phase: Phase::Message2(hs),
            login,
            hello: None,
            messages: MessageReader::default(),
            frames: FrameReader::new(),
            events: VecDeque::new(),
            out,
            frame_buf: Vec::new(),
            unanswered: HashMap::new(),
            weight: 0,
            next_id: 1,
            handshake_hash: [0; 32],
        })
    }

    /// This connection's Noise handshake hash, once message 3 is sent (zeros before):
    /// what a LEGACY_LOGIN proof is bound to.
    pub fn handshake_hash(&self) -> [u8; 32] {
        self.handshake_hash
    }

    /// Bytes to write.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Takes all the output (to write it elsewhere).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Takes all the output into `buf` (cleared first), leaving `buf`'s old
    /// allocation to the session: a writer that keeps one buffer swaps it back and
    /// forth, and a large request's frame is not written into fresh memory each time.
    pub fn swap_output(&mut self, buf: &mut Vec<u8>) {
        buf.clear();
        std::mem::swap(&mut self.out, buf);
    }

    /// `n` bytes of the output were written.
    pub fn consume_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// What the server said of itself (after [`Event::ServerKey`]).
    pub fn server_hello(&self) -> Option<&ServerHello> {
        self.hello.as_ref()
    }

    /// True once logged in.
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    /// Requests sent and not answered.
    pub fn unanswered(&self) -> usize {
        self.unanswered.len()
    }

    /// Their weight (16 + body bytes each).
    pub fn weight(&self) -> u64 {
        self.weight
    }

    /// The server's window.
    pub fn window(&self) -> u64 {
        self.hello.as_ref().map_or(0, |h| h.window as u64)
    }

    /// Whether a request with a body of `body_len` bytes fits the window now.
    pub fn can_send(&self, body_len: u64) -> bool {
        if !self.is_ready() {
            return false;
        }
        self.unanswered.is_empty()
            || self.weight + FRAME_HEADER_LEN as u64 + body_len <= self.window()
    }

    /// The caller accepts the server's key: sends handshake message 3 with the login.
    pub fn accept_server(&mut self) -> Result<(), ClientError> {
        let Phase::Pin(mut hs) = std::mem::replace(&mut self.phase, Phase::Failed) else {
            return Err(ClientError::State("no server key to accept"));
        };
        hs.write(&self.login.encode(), &mut self.out)?;
        self.handshake_hash = hs.handshake_hash();
        self.phase = Phase::Welcome(hs.into_transport()?);
        Ok(())
    }

    /// Sends a request; returns its id. The caller checks [`Self::can_send`] first
    /// (a request over the window is a protocol error the server closes on).
    pub fn send(&mut self, req: &Request) -> Result<u32, ClientError> {
        let Phase::Ready(transport) = &mut self.phase else {
            return Err(ClientError::State("not logged in"));
        };
        let mut id = self.next_id;
        while id == 0 || self.unanswered.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        self.frame_buf.clear();
        wire::encode_request(id, req, &mut self.frame_buf);
        let weight = self.frame_buf.len() as u64;
        transport.seal(&self.frame_buf, &mut self.out)?;
        self.unanswered.insert(id, weight);
        self.weight += weight;
        Ok(id)
    }

    /// Sends a frame of any kind with any body (tests and fuzzing only: a client that
    /// speaks out of the spec).
    #[doc(hidden)]
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn send_raw(&mut self, kind: u16, body: &[u8]) -> Result<u32, ClientError> {
        let Phase::Ready(transport) = &mut self.phase else {
            return Err(ClientError::State("not logged in"));
        };
        let id = self.next_id;
        self.next_id += 1;
        let h = wire::FrameHeader {
            kind,
            flags: 0,
            request_id: id,
            len: body.len() as u64,
        };
        let mut f = h.encode().to_vec();
        f.extend_from_slice(body);
        transport.seal(&f, &mut self.out)?;
        self.unanswered.insert(id, f.len() as u64);
        self.weight += f.len() as u64;
        Ok(id)
    }

    /// Seals arbitrary plaintext into records (fuzzing only: a stream that need not
    /// be frames).
    #[doc(hidden)]
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn send_plain(&mut self, plain: &[u8]) -> Result<(), ClientError> {
        let Phase::Ready(transport) = &mut self.phase else {
            return Err(ClientError::State("not logged in"));
        };
        transport.seal(plain, &mut self.out)?;
        Ok(())
    }

    /// Takes bytes from the socket (all of them).
    pub fn handle_input(&mut self, input: &[u8]) -> Result<(), ClientError> {
        let mut rest = input;
        // Whole messages at the front of the input, with none begun before them, are
        // handled where they lie (the common case), not copied first.
        while self.messages.buffered() == 0 && !self.pinning() {
            let Some((msg, n)) = noise::whole_message(rest) else {
                break;
            };
            self.process_message(msg)?;
            rest = &rest[n..];
        }
        self.messages.push(rest);
        // The reader is moved out while its messages are decrypted straight from its
        // buffer, and put back on every way out.
        let mut messages = std::mem::take(&mut self.messages);
        let r = self.process_messages_from(&mut messages);
        self.messages = messages;
        r
    }

    /// Nothing more is read until the caller has checked the server's key.
    fn pinning(&self) -> bool {
        matches!(self.phase, Phase::Pin(_))
    }

    fn process_messages_from(&mut self, messages: &mut MessageReader) -> Result<(), ClientError> {
        while !self.pinning() {
            let Some(msg) = messages.next_message() else {
                break;
            };
            self.process_message(msg)?;
        }
        Ok(())
    }

    /// Handles one Noise message (without its length prefix); a record is decrypted
    /// straight into the frame reader.
    fn process_message(&mut self, msg: &[u8]) -> Result<(), ClientError> {
        match std::mem::replace(&mut self.phase, Phase::Failed) {
            Phase::Message2(mut hs) => {
                let payload = hs.read(msg)?;
                let hello = ServerHello::decode(&payload)?;
                let key = hs.remote_static().ok_or(ClientError::Handshake)?;
                self.hello = Some(hello.clone());
                self.events.push_back(Event::ServerKey { key, hello });
                self.phase = Phase::Pin(hs);
                Ok(())
            }
            phase @ (Phase::Welcome(_) | Phase::Ready(_)) => {
                self.phase = phase;
                if let Phase::Welcome(t) | Phase::Ready(t) = &mut self.phase {
                    t.open_into(msg, &mut self.frames)?;
                }
                self.process_frames()
            }
            Phase::Pin(_) | Phase::Failed => Err(ClientError::State("the connection has failed")),
        }
    }

    fn process_frames(&mut self) -> Result<(), ClientError> {
        let max_chunk = self.hello.as_ref().map_or(0, |h| h.max_chunk);
        while let Some((h, body)) = self
            .frames
            .next_frame(|k| max_answer_len(k, max_chunk), 0)?
        {
            let answer = Answer::decode(h.kind, body)?;
            if matches!(self.phase, Phase::Welcome(_)) {
                match answer {
                    Answer::Welcome(w) => {
                        if let Phase::Welcome(t) = std::mem::replace(&mut self.phase, Phase::Failed)
                        {
                            self.phase = Phase::Ready(t);
                        }
                        self.events.push_back(Event::Welcome(w));
                        continue;
                    }
                    Answer::Error(e) => {
                        self.phase = Phase::Failed;
                        return Err(ClientError::Refused(e));
                    }
                    _ => return Err(ClientError::UnexpectedAnswer(h.request_id)),
                }
            }
            if let Answer::Error(e) = &answer {
                if e.code.closes() {
                    self.phase = Phase::Failed;
                    return Err(ClientError::Closed(e.clone()));
                }
            }
            match self.unanswered.remove(&h.request_id) {
                Some(w) => self.weight -= w,
                None => {
                    if let Answer::Error(e) = answer {
                        // A connection-level error (request id 0 or unknown).
                        self.phase = Phase::Failed;
                        return Err(ClientError::Closed(e));
                    }
                    return Err(ClientError::UnexpectedAnswer(h.request_id));
                }
            }
            self.events.push_back(Event::Answer {
                request_id: h.request_id,
                answer,
            });
        }
        Ok(())
    }
}
