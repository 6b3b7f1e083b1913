//! Parsing a virtio-blk request from a descriptor chain the guest wrote, trusting nothing in it.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::SECTOR_SIZE;
use crate::vstate::memory::GuestMemory;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// `struct virtio_blk_outhdr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHeader {
    pub request_type: u32,
    pub reserved: u32,
    pub sector: u64,
}

// SAFETY: RequestHeader is repr(C) and made of integers only, without padding (4 + 4 + 8 bytes):
// every byte pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// Guest buffers in order: device-writable for In and GetId, device-readable for Out.
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
    pub status: GuestAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the chain has no status descriptor")]
    TooShort,
    #[error("the last descriptor is not a device-writable status byte")]
    BadStatus,
    #[error("the header descriptor is device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("the header lies outside guest memory")]
    ReadHeader,
    #[error("a data buffer lies outside guest memory")]
    BadBuffer,
    #[error("a data buffer has the wrong direction for the request")]
    WrongDirection,
    #[error("the data length {0} is not a whole number of sectors")]
    UnalignedLength(u64),
    #[error("the request reaches past the end of the disk")]
    OutOfRange,
    #[error("GET_ID needs one device-writable buffer")]
    BadIdBuffer,
}

/// Where the guest wants the status byte, if the chain names a usable one; a chain without one
/// can only be returned unused.
pub fn status_address(descriptors: &[Descriptor], memory: &GuestMemory) -> Option<GuestAddress> {
    let last = descriptors.last()?;
    (descriptors.len() >= 2
        && last.is_write_only()
        && last.len() >= 1
        && memory.address_in_range(last.addr()))
    .then(|| last.addr())
}

/// Checks a request against the disk of `capacity_sectors` and the guest's memory.
pub fn parse(
    descriptors: &[Descriptor],
    memory: &GuestMemory,
    capacity_sectors: u64,
) -> Result<Request, Error> {
    if descriptors.len() < 2 {
        return Err(Error::TooShort);
    }
    let status = status_address(descriptors, memory).ok_or(Error::BadStatus)?;
    let header_desc = descriptors[0];
    if header_desc.is_write_only() || (header_desc.len() as usize) < std::mem::size_of::<RequestHeader>() {
        return Err(Error::BadHeader);
    }
    let header: RequestHeader = memory.read_obj(header_desc.addr()).map_err(|_| Error::ReadHeader)?;
    let kind = RequestType::from(header.request_type);
    if let RequestType::Unsupported(_) = kind {
        // Answered UNSUPP whatever its buffers look like.
        return Ok(Request { kind, sector: header.sector, data: Vec::new(), data_len: 0, status });
    }
    let data_descs = &descriptors[1..descriptors.len() - 1];
    let mut data = Vec::with_capacity(data_descs.len());
    let mut data_len = 0u64;
    for desc in data_descs {
        let wants_writable = matches!(kind, RequestType::In | RequestType::GetId);
        if desc.is_write_only() != wants_writable {
            return Err(Error::WrongDirection);
        }
        if memory.get_slice(desc.addr(), desc.len() as usize).is_err() {
            return Err(Error::BadBuffer);
        }
        data.push((desc.addr(), desc.len()));
        data_len += u64::from(desc.len());
    }
    match kind {
        RequestType::In | RequestType::Out => {
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(Error::UnalignedLength(data_len));
            }
            let end = header.sector.checked_add(data_len / SECTOR_SIZE).ok_or(Error::OutOfRange)?;
            if end > capacity_sectors {
                return Err(Error::OutOfRange);
            }
        }
        RequestType::GetId if data.len() != 1 => return Err(Error::BadIdBuffer),
        _ => {}
    }
    Ok(Request { kind, sector: header.sector, data, data_len, status })
}

/// The descriptors of a chain, as many as the queue allows (virtio-queue stops loops).
pub fn collect(chain: DescriptorChain<&GuestMemory>) -> Vec<Descriptor> {
    chain.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HEADER: u64 = 0x1000;

    fn memory_with_header(kind: u32, sector: u64) -> GuestMemory {
        let memory = create_guest_memory(16, crate::vstate::memory::Sharing::Private).unwrap();
        memory
            .write_obj(RequestHeader { request_type: kind, reserved: 0, sector }, GuestAddress(HEADER))
            .unwrap();
        memory
    }

    fn desc(addr: u64, len: u32, flags: u16) -> SplitDescriptor {
        SplitDescriptor::new(addr, len, flags, 0)
    }

    #[test]
    fn a_read_request_parses() {
        let memory = memory_with_header(VIRTIO_BLK_T_IN, 2);
        let chain = [desc(HEADER, 16, 0), desc(0x2000, 1024, W), desc(0x3000, 1, W)];
        let request = parse(&chain, &memory, 8).unwrap();
        assert_eq!(request.kind, RequestType::In);
        assert_eq!((request.sector, request.data_len, request.status), (2, 1024, GuestAddress(0x3000)));
    }

    #[test]
    fn malformed_requests_are_named() {
        let memory = memory_with_header(VIRTIO_BLK_T_IN, 0);
        let cases: Vec<(Vec<SplitDescriptor>, Error)> = vec![
            (vec![desc(HEADER, 16, 0)], Error::TooShort),
            (vec![desc(HEADER, 16, 0), desc(0x3000, 1, 0)], Error::BadStatus),
            (vec![desc(HEADER, 16, 0), desc(0x3000, 0, W)], Error::BadStatus),
            (vec![desc(HEADER, 8, 0), desc(0x3000, 1, W)], Error::BadHeader),
            (vec![desc(HEADER, 16, W), desc(0x3000, 1, W)], Error::BadHeader),
            (vec![desc(0x7fff_0000, 16, 0), desc(0x3000, 1, W)], Error::ReadHeader),
            (vec![desc(HEADER, 16, 0), desc(0x2000, 512, 0), desc(0x3000, 1, W)], Error::WrongDirection),
            (vec![desc(HEADER, 16, 0), desc(0xfff000, 0x10_0000, W), desc(0x3000, 1, W)], Error::BadBuffer),
            (
                vec![desc(HEADER, 16, 0), desc(0x2000, 100, W), desc(0x3000, 1, W)],
                Error::UnalignedLength(100),
            ),
            (vec![desc(HEADER, 16, 0), desc(0x2000, 512 * 9, W), desc(0x3000, 1, W)], Error::OutOfRange),
        ];
        for (chain, expected) in cases {
            assert_eq!(parse(&chain, &memory, 8), Err(expected), "{chain:?}");
        }
    }

    #[test]
    fn a_sector_near_u64_max_does_not_overflow() {
        let memory = memory_with_header(VIRTIO_BLK_T_OUT, u64::MAX);
        let chain = [desc(HEADER, 16, 0), desc(0x2000, 512, 0), desc(0x3000, 1, W)];
        assert_eq!(parse(&chain, &memory, 8), Err(Error::OutOfRange));
    }

    #[test]
    fn get_id_wants_exactly_one_writable_buffer() {
        let memory = memory_with_header(VIRTIO_BLK_T_GET_ID, 0);
        let ok = [desc(HEADER, 16, 0), desc(0x2000, 20, W), desc(0x3000, 1, W)];
        assert_eq!(parse(&ok, &memory, 8).unwrap().kind, RequestType::GetId);
        let two = [desc(HEADER, 16, 0), desc(0x2000, 10, W), desc(0x2100, 10, W), desc(0x3000, 1, W)];
        assert_eq!(parse(&two, &memory, 8), Err(Error::BadIdBuffer));
    }

    #[test]
    fn unknown_types_parse_as_unsupported() {
        let memory = memory_with_header(99, 0);
        let chain = [desc(HEADER, 16, 0), desc(0x3000, 1, W)];
        assert_eq!(parse(&chain, &memory, 8).unwrap().kind, RequestType::Unsupported(99));
        let with_data = [desc(HEADER, 16, 0), desc(0x2000, 512, W), desc(0x3000, 1, W)];
        assert_eq!(parse(&with_data, &memory, 8).unwrap().kind, RequestType::Unsupported(99));
    }
}
