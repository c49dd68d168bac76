use super::*;
use crate::config::Pricing;
use crate::entitlement::DryRunMode;
use crate::platform::Platform;

#[test]
fn the_pricing_route_table() {
    use Platform::*;
    use Pricing::*;
    let table = [
        (Hourly, Ecs, Some(Route::Register)),
        (Hourly, Eks, Some(Route::Register)),
        (Hourly, Unknown, Some(Route::Register)),
        (Hourly, Ec2, None),
        (Custom, Ecs, Some(Route::DryRun(DryRunMode::Container))),
        (Custom, Eks, Some(Route::DryRun(DryRunMode::Container))),
        (Custom, Ec2, Some(Route::DryRun(DryRunMode::Ami))),
        (HourlyCustom, Ecs, Some(Route::Register)),
        (HourlyCustom, Eks, Some(Route::Register)),
        (HourlyCustom, Ec2, Some(Route::DryRun(DryRunMode::Ami))),
        (Contract, Ecs, Some(Route::Contract)),
        (Contract, Ec2, Some(Route::Contract)),
        (ContractCustom, Eks, Some(Route::Contract)),
        (ContractCustom, Unknown, Some(Route::Contract)),
    ];
    for (pricing, platform, want) in table {
        match (entitlement_route(pricing, platform), want) {
            (Ok(route), Some(want)) => assert_eq!(route, want, "{pricing} on {platform}"),
            (Err(e), None) => {
                assert_eq!(e.exit_code(), crate::exit::Exit::Configuration, "{e}");
                assert!(e.to_string().contains("cannot run on EC2"), "{e}");
            }
            (got, want) => panic!("{pricing} on {platform}: {got:?}, want {want:?}"),
        }
    }
}
