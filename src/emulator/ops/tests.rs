use super::*;

#[test]
fn ids_are_uuid_shaped_and_reproducible() {
    let a = new_id(&mut StdRng::seed_from_u64(1));
    let b = new_id(&mut StdRng::seed_from_u64(1));
    assert_eq!(a, b);
    assert_eq!(a.len(), 36);
    assert_eq!(&a[14..15], "4");
}
