//! User-space side of the peer table (see `kube_dsr_common::PeerSlot`):
//! open addressing with the VIP tables' publication order.

use std::{
    collections::BTreeSet,
    ptr::{addr_of_mut, write_volatile},
    sync::atomic::{Ordering, fence},
};

use kube_dsr_common::{PEER_PROBES, PEER_SLOTS, PeerSlot, SLOT_DELETED, SLOT_USED, peer_slot};

use super::sys::Mapped;

fn probe(mac: [u8; 6]) -> impl Iterator<Item = usize> {
    let (hi, lo) = PeerSlot::words(mac);
    let first = peer_slot(hi, lo);
    (0..PEER_PROBES).map(move |i| ((first + i) & (PEER_SLOTS - 1)) as usize)
}

fn holds(s: &PeerSlot, mac: [u8; 6]) -> bool {
    let (hi, lo) = PeerSlot::words(mac);
    s.state == SLOT_USED && s.mac_hi == hi && s.mac_lo == lo
}

/// The MACs in the table.
pub fn entries(table: &Mapped<PeerSlot>) -> BTreeSet<[u8; 6]> {
    table.as_slice().iter().filter(|s| s.state == SLOT_USED).map(mac_of).collect()
}

fn mac_of(s: &PeerSlot) -> [u8; 6] {
    let (a, b) = (s.mac_hi.to_ne_bytes(), s.mac_lo.to_ne_bytes());
    [a[0], a[1], a[2], a[3], b[0], b[1]]
}

/// Makes the table hold exactly `macs`: MACs that leave are removed first
/// (freeing their slots), then new ones are published; a MAC in both sets
/// is never touched. Returns the MACs that found no slot within reach (the
/// others are placed).
pub fn set_all(table: &mut Mapped<PeerSlot>, macs: &BTreeSet<[u8; 6]>) -> Vec<[u8; 6]> {
    let mut unplaced = Vec::new();
    for i in 0..table.as_slice().len() {
        let s = table.as_slice()[i];
        if s.state == SLOT_USED && !macs.contains(&mac_of(&s)) {
            let p = table.element(i);
            // SAFETY: p points at slot i of the live mapping; no reference
            // into it is created.
            unsafe { write_volatile(addr_of_mut!((*p).state), SLOT_DELETED) };
        }
    }
    for &mac in macs {
        if probe(mac).any(|i| holds(&table.as_slice()[i], mac)) {
            continue;
        }
        let Some(i) = probe(mac).find(|&i| table.as_slice()[i].state != SLOT_USED) else {
            unplaced.push(mac);
            continue;
        };
        let (mac_hi, mac_lo) = PeerSlot::words(mac);
        let state = table.as_slice()[i].state;
        let p = table.element(i);
        // Fill while unpublished, then publish (see the VIP tables).
        // SAFETY: p points at slot i of the live mapping.
        unsafe { write_volatile(p, PeerSlot { mac_hi, mac_lo, state, _pad: 0 }) };
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { write_volatile(addr_of_mut!((*p).state), SLOT_USED) };
    }
    unplaced
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(i: u32) -> [u8; 6] {
        let b = i.to_be_bytes();
        [2, 0xaa, b[0], b[1], b[2], b[3]]
    }

    #[test]
    fn the_table_holds_exactly_the_last_set() {
        let mut t: Mapped<PeerSlot> = Mapped::anonymous(PEER_SLOTS as usize).unwrap();
        let first: BTreeSet<_> = (0..200).map(mac).collect();
        assert!(set_all(&mut t, &first).is_empty());
        assert_eq!(entries(&t), first);
        let second: BTreeSet<_> = (100..300).map(mac).collect();
        assert!(set_all(&mut t, &second).is_empty());
        assert_eq!(entries(&t), second);
        assert!(set_all(&mut t, &BTreeSet::new()).is_empty());
        assert!(entries(&t).is_empty());
    }
}
