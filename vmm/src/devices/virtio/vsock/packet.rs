//! Reading a virtio-vsock tx packet from a descriptor chain the guest wrote, trusting nothing in
//! it. The header comes first and the data after it, over as many device-readable descriptors as
//! the driver used: Linux puts both in one descriptor (since 6.2), or the header in one and the
//! data in page fragments, one descriptor each, for payloads over about 32 KiB (since 6.12.41 and
//! 6.16, "vsock/virtio: Allocate nonlinear SKBs"). The spec allows any split; so does this.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes};

use super::muxer::Header;
use super::MAX_PKT_DATA;
use crate::vstate::memory::GuestMemory;

/// `struct virtio_vsock_hdr`.
pub const HEADER_LEN: usize = 44;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("a descriptor of a tx packet is device-writable")]
    WriteOnly,
    #[error("the chain holds {0} bytes, less than a packet header")]
    ShortHeader(usize),
    #[error("the header claims {0} bytes of data, more than a packet carries")]
    TooLong(u32),
    #[error("the header claims {claimed} bytes of data; the chain holds {held}")]
    ShortData { claimed: u32, held: usize },
    #[error("a descriptor lies outside guest memory")]
    OutsideMemory,
}

/// Reads the packet the descriptors hold into `buf` (the header, then the data); returns the
/// header and the data's length. Bytes past the header's length are ignored; at most
/// HEADER_LEN + MAX_PKT_DATA bytes are read whatever the chain claims.
pub fn read_tx(
    descriptors: &[Descriptor],
    memory: &GuestMemory,
    buf: &mut Vec<u8>,
) -> Result<(Header, usize), Error> {
    buf.clear();
    let mut wanted = HEADER_LEN;
    let mut header = None;
    for desc in descriptors {
        if desc.is_write_only() {
            return Err(Error::WriteOnly);
        }
        let mut offset = 0usize;
        let available = desc.len() as usize;
        while offset < available && buf.len() < wanted {
            let take = (wanted - buf.len()).min(available - offset);
            let start = buf.len();
            buf.resize(start + take, 0);
            let address = desc.addr().checked_add(offset as u64).ok_or(Error::OutsideMemory)?;
            memory.read_slice(&mut buf[start..], address).map_err(|_| Error::OutsideMemory)?;
            offset += take;
            if header.is_none() && buf.len() == HEADER_LEN {
                let parsed = parse_header(&buf[..HEADER_LEN]);
                if parsed.len > MAX_PKT_DATA {
                    return Err(Error::TooLong(parsed.len));
                }
                wanted = HEADER_LEN + parsed.len as usize;
                header = Some(parsed);
            }
        }
        if buf.len() == wanted && header.is_some() {
            break;
        }
    }
    let Some(parsed) = header else { return Err(Error::ShortHeader(buf.len())) };
    let held = buf.len() - HEADER_LEN;
    if held < parsed.len as usize {
        return Err(Error::ShortData { claimed: parsed.len, held });
    }
    Ok((parsed.header, held))
}

/// The header's fields and the data length it claims.
struct Parsed {
    header: Header,
    len: u32,
}

fn parse_header(bytes: &[u8]) -> Parsed {
    let u64_at = |at: usize| u64::from_le_bytes(std::array::from_fn(|i| bytes[at + i]));
    let u32_at = |at: usize| u32::from_le_bytes(std::array::from_fn(|i| bytes[at + i]));
    let u16_at = |at: usize| u16::from_le_bytes(std::array::from_fn(|i| bytes[at + i]));
    Parsed {
        header: Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        },
        len: u32_at(24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestAddress;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn header_bytes(op: u16, len: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(&3u64.to_le_bytes());
        h.extend_from_slice(&2u64.to_le_bytes());
        h.extend_from_slice(&1234u32.to_le_bytes());
        h.extend_from_slice(&5000u32.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&op.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&4096u32.to_le_bytes());
        h.extend_from_slice(&7u32.to_le_bytes());
        h
    }

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    /// Guest memory with the header at 0x1000 and `data` spread over pages from 0x10000, each
    /// piece in its own page (as page fragments are).
    fn memory_with(op: u16, data: &[u8], piece: usize) -> (GuestMemory, Vec<Descriptor>) {
        let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
        memory.write_slice(&header_bytes(op, data.len() as u32), GuestAddress(0x1000)).unwrap();
        let mut descriptors = vec![desc(0x1000, HEADER_LEN as u32, 0)];
        for (i, chunk) in data.chunks(piece).enumerate() {
            let address = 0x10000 + (i as u64) * 0x2000;
            memory.write_slice(chunk, GuestAddress(address)).unwrap();
            descriptors.push(desc(address, chunk.len() as u32, 0));
        }
        (memory, descriptors)
    }

    #[test]
    fn data_in_page_fragments_is_gathered_in_order() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let (memory, descriptors) = memory_with(5, &data, 4096);
        assert_eq!(descriptors.len(), 17);
        let mut buf = Vec::new();
        let (header, len) = read_tx(&descriptors, &memory, &mut buf).unwrap();
        assert_eq!((header.op, header.src_port, header.dst_port, header.fwd_cnt), (5, 1234, 5000, 7));
        assert_eq!(len, 65536);
        assert_eq!(&buf[HEADER_LEN..], &data[..]);
    }

    #[test]
    fn header_and_data_in_one_descriptor() {
        let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
        let mut packet = header_bytes(5, 5);
        packet.extend_from_slice(b"hello, and more bytes than claimed");
        memory.write_slice(&packet, GuestAddress(0x1000)).unwrap();
        let mut buf = Vec::new();
        let (_, len) = read_tx(&[desc(0x1000, packet.len() as u32, 0)], &memory, &mut buf).unwrap();
        assert_eq!(&buf[HEADER_LEN..HEADER_LEN + len], b"hello");
    }

    #[test]
    fn a_header_split_over_descriptors_is_read_whole() {
        let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
        let packet = header_bytes(1, 0);
        memory.write_slice(&packet[..10], GuestAddress(0x1000)).unwrap();
        memory.write_slice(&packet[10..], GuestAddress(0x3000)).unwrap();
        let mut buf = Vec::new();
        let chain = [desc(0x1000, 10, 0), desc(0x3000, 34, 0)];
        let (header, len) = read_tx(&chain, &memory, &mut buf).unwrap();
        assert_eq!((header.op, len), (1, 0));
    }

    #[test]
    fn malformed_packets_are_named() {
        let (memory, mut descriptors) = memory_with(5, &[1u8; 100], 50);
        let mut buf = Vec::new();
        assert_eq!(read_tx(&[], &memory, &mut buf), Err(Error::ShortHeader(0)));
        assert_eq!(read_tx(&[desc(0x1000, 10, 0)], &memory, &mut buf), Err(Error::ShortHeader(10)));
        assert_eq!(
            read_tx(&descriptors[..2], &memory, &mut buf),
            Err(Error::ShortData { claimed: 100, held: 50 })
        );
        descriptors[2] = desc(0x10000, 50, W);
        assert_eq!(read_tx(&descriptors, &memory, &mut buf), Err(Error::WriteOnly));
        descriptors[2] = desc(0x7ff0_0000_0000, 50, 0);
        assert_eq!(read_tx(&descriptors, &memory, &mut buf), Err(Error::OutsideMemory));
        memory.write_slice(&header_bytes(5, MAX_PKT_DATA + 1), GuestAddress(0x1000)).unwrap();
        assert_eq!(read_tx(&descriptors[..1], &memory, &mut buf), Err(Error::TooLong(MAX_PKT_DATA + 1)));
    }

    #[test]
    fn a_chain_claiming_gigabytes_costs_at_most_one_packet() {
        let (memory, _) = memory_with(5, &[9u8; 16], 16);
        let mut buf = Vec::new();
        // The data descriptor claims 4 GiB; only the 16 bytes the header asks for are read.
        let chain = [desc(0x1000, HEADER_LEN as u32, 0), desc(0x10000, u32::MAX, 0)];
        let (_, len) = read_tx(&chain, &memory, &mut buf).unwrap();
        assert_eq!((len, buf.len()), (16, HEADER_LEN + 16));
    }
}
