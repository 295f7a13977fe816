//! A blocking rtnetlink socket in the calling thread's network namespace:
//! one request, its replies. Shared by `netns` (addresses on `lo`) and
//! `neigh` (routes and neighbours).

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Maps an I/O error of step `what` to the crate's netlink error.
pub(crate) fn nl_err(what: &'static str) -> impl FnOnce(io::Error) -> crate::Error {
    move |source| crate::Error::Netlink { what, source }
}

pub(crate) struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    /// Opens, binds and connects a socket; the error says which step failed.
    pub(crate) fn open() -> Result<Self, (&'static str, io::Error)> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| ("opening a netlink socket", e))?;
        sock.bind_auto().map_err(|e| ("binding a netlink socket", e))?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(|e| ("connecting a netlink socket", e))?;
        Ok(Self { sock, seq: 0 })
    }

    /// Sends one request and collects the replies up to the ack or the end
    /// of the dump.
    pub(crate) fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;

        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zero-length netlink message",
                    ));
                }
                off += len.next_multiple_of(4);
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(out),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        // A non-dump answer without an ack ends here.
                        if flags & NLM_F_DUMP != NLM_F_DUMP && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
