//! Connection identifiers.
//!
//! A [`ConnId`] is a slot (the index of the connection in its owner's slab, which the mio shell
//! also uses as the connection's `Token`) plus a generation that grows every time the slot is
//! reused. The public `conn_id` of WELCOME is `generation << 32 | slot`: never 0 (generations
//! start at 1) and never repeated in one run until a single slot has been reused 2^32 times.

/// A connection's identity: slab slot plus generation.
///
/// `Display` prints the wire value (WELCOME's `conn_id`, as logs show it); `Debug` prints the
/// parts, `ConnId(slot 3, gen 2)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl std::fmt::Debug for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnId(slot {}, gen {})", self.slot(), self.generation())
    }
}

impl ConnId {
    /// The id of `slot` in its `generation` (which must be non-zero).
    pub fn new(slot: usize, generation: u32) -> ConnId {
        debug_assert!(
            generation != 0,
            "generation 0 would make conn_id 0 possible"
        );
        debug_assert!(slot <= u32::MAX as usize);
        ConnId((generation as u64) << 32 | slot as u64)
    }

    /// The slab slot.
    pub fn slot(self) -> usize {
        (self.0 & 0xFFFF_FFFF) as usize
    }

    /// The slot's generation.
    pub fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The wire value (WELCOME's `conn_id`).
    pub fn to_u64(self) -> u64 {
        self.0
    }

    /// The id with this wire value, if it is a possible one.
    pub fn from_u64(v: u64) -> Option<ConnId> {
        (v >> 32 != 0).then_some(ConnId(v))
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hands out [`ConnId`]s for slots of a slab the caller owns: call [`Generations::next`] with
/// the key of each new entry. Runtimes that drive the sans-IO core themselves use this next to
/// their own `Slab`, as the mio shell does.
#[derive(Debug, Default)]
pub struct Generations {
    gens: Vec<u32>,
}

impl Generations {
    /// A fresh set (every slot at generation 0, so its first id has generation 1).
    pub fn new() -> Self {
        Self::default()
    }

    /// The id for a new occupant of `slot`.
    pub fn next(&mut self, slot: usize) -> ConnId {
        if slot >= self.gens.len() {
            self.gens.resize(slot + 1, 0);
        }
        let g = &mut self.gens[slot];
        *g = g.wrapping_add(1).max(1);
        ConnId::new(slot, *g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_zero_and_never_repeat_per_slot() {
        let mut g = Generations::new();
        let a = g.next(0);
        let b = g.next(0);
        let c = g.next(5);
        assert_ne!(a, b);
        assert_ne!(a.to_u64(), 0);
        assert_eq!(a.slot(), 0);
        assert_eq!(b.generation(), 2);
        assert_eq!(c.slot(), 5);
        assert_eq!(c.generation(), 1);
        assert_eq!(ConnId::from_u64(b.to_u64()), Some(b));
        assert_eq!(ConnId::from_u64(7), None);
        assert_eq!(format!("{b:?}"), "ConnId(slot 0, gen 2)");
        assert_eq!(b.to_string(), (2u64 << 32).to_string());
    }
}
