use super::*;
use crate::emulator::model::{Tag, MICROS_PER_UNIT};

fn alloc(quantity: i64, tags: &[(&str, &str)]) -> Allocation {
    Allocation {
        quantity,
        quantity_as_decimal: None,
        tags: if tags.is_empty() {
            None
        } else {
            Some(
                tags.iter()
                    .map(|(k, v)| Tag {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
            )
        },
    }
}

fn check(allocs: &[Allocation], quantity: i64) -> Result<(), String> {
    check_allocations(Some(allocs), quantity * MICROS_PER_UNIT, false, 500)
        .map_err(|e| e.error_type)
}

#[test]
fn allocation_rules_table() {
    let five: Vec<(String, String)> = (0..5).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let five: Vec<(&str, &str)> = five.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let six: Vec<(String, String)> = (0..6).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let six: Vec<(&str, &str)> = six.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let long_key = "k".repeat(101);
    let long_value = "v".repeat(257);
    type Case<'a> = (&'a str, Vec<Allocation>, i64, Result<(), &'a str>);
    let cases: Vec<Case> = vec![
        (
            "sum equals quantity",
            vec![alloc(3, &[("a", "1")]), alloc(2, &[])],
            5,
            Ok(()),
        ),
        (
            "sum differs",
            vec![alloc(3, &[("a", "1")]), alloc(1, &[])],
            5,
            Err("InvalidUsageAllocationsException"),
        ),
        (
            "duplicate tag sets",
            vec![
                alloc(1, &[("a", "1"), ("b", "2")]),
                alloc(1, &[("b", "2"), ("a", "1")]),
            ],
            2,
            Err("InvalidUsageAllocationsException"),
        ),
        (
            "two untagged buckets",
            vec![alloc(1, &[]), alloc(1, &[])],
            2,
            Err("InvalidUsageAllocationsException"),
        ),
        ("five tags ok", vec![alloc(1, &five)], 1, Ok(())),
        (
            "six tags",
            vec![alloc(1, &six)],
            1,
            Err("InvalidTagException"),
        ),
        (
            "six distinct keys across list",
            vec![alloc(1, &five), alloc(1, &[("k5", "v")])],
            2,
            Err("InvalidTagException"),
        ),
        (
            "key too long",
            vec![alloc(1, &[(&long_key, "v")])],
            1,
            Err("InvalidTagException"),
        ),
        (
            "key max length",
            vec![alloc(1, &[(&long_key[..100], "v")])],
            1,
            Ok(()),
        ),
        (
            "value too long",
            vec![alloc(1, &[("k", &long_value)])],
            1,
            Err("InvalidTagException"),
        ),
        (
            "value max length",
            vec![alloc(1, &[("k", &long_value[..256])])],
            1,
            Ok(()),
        ),
        (
            "key bad char",
            vec![alloc(1, &[("k?", "v")])],
            1,
            Err("InvalidTagException"),
        ),
        (
            "value bad char",
            vec![alloc(1, &[("k", "v>")])],
            1,
            Err("InvalidTagException"),
        ),
        (
            "range space..= allowed",
            vec![alloc(1, &[("a b!#", "x,y;z<")])],
            1,
            Ok(()),
        ),
        (
            "empty tag list",
            vec![Allocation {
                quantity: 1,
                quantity_as_decimal: None,
                tags: Some(vec![]),
            }],
            1,
            Err("InvalidTagException"),
        ),
        (
            "same key twice in one allocation",
            vec![alloc(1, &[("a", "1"), ("a", "2")])],
            1,
            Err("InvalidTagException"),
        ),
    ];
    for (name, allocs, quantity, want) in cases {
        assert_eq!(
            check(&allocs, quantity),
            want.map_err(str::to_owned),
            "{name}"
        );
    }
}

#[test]
fn allocation_count_limit_is_configurable() {
    let allocs: Vec<Allocation> = (0..3)
        .map(|i| alloc(1, &[("k", &format!("v{i}"))]))
        .collect();
    let three = 3 * MICROS_PER_UNIT;
    assert!(check_allocations(Some(&allocs), three, false, 3).is_ok());
    let err = check_allocations(Some(&allocs), three, false, 2).expect_err("over limit");
    assert_eq!(err.error_type, "InvalidUsageAllocationsException");
    assert!(err.message.contains("greater than 2"));
}
