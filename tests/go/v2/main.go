// The AWS SDK for Go v2 (Debian's golang-github-aws-aws-sdk-go-v2-dev, GOPATH mode) against
// `meterd emulator` at $METERD_EMULATOR_URL: the four operations and a typed exception.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	mm "github.com/aws/aws-sdk-go-v2/service/marketplacemetering"
	"github.com/aws/aws-sdk-go-v2/service/marketplacemetering/types"
)

func main() {
	ctx := context.Background()
	c := mm.New(mm.Options{
		Region:           "us-east-1",
		Credentials:      credentials.NewStaticCredentialsProvider("AKIDGOV2", "secret", ""),
		EndpointResolver: mm.EndpointResolverFromURL(os.Getenv("METERD_EMULATOR_URL")),
		RetryMaxAttempts: 1,
	})
	hour := time.Now().UTC().Truncate(time.Hour).Add(-time.Hour)
	fail := func(what string, err error) {
		fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
		os.Exit(1)
	}
	if _, err := c.RegisterUsage(ctx, &mm.RegisterUsageInput{ProductCode: aws.String("prod-demo1234"), PublicKeyVersion: aws.Int32(1)}); err != nil {
		fail("RegisterUsage", err)
	}
	meter := &mm.MeterUsageInput{ProductCode: aws.String("prod-demo1234"), Timestamp: &hour, UsageDimension: aws.String("requests"), UsageQuantity: aws.Int32(5)}
	out, err := c.MeterUsage(ctx, meter)
	if err != nil {
		fail("MeterUsage", err)
	}
	meter.UsageQuantity = aws.Int32(6)
	_, err = c.MeterUsage(ctx, meter)
	var dup *types.DuplicateRequestException
	if !errors.As(err, &dup) {
		fail("MeterUsage (duplicate) not a *types.DuplicateRequestException", err)
	}
	batch, err := c.BatchMeterUsage(ctx, &mm.BatchMeterUsageInput{ProductCode: aws.String("prod-demo1234"), UsageRecords: []types.UsageRecord{
		{Timestamp: &hour, CustomerIdentifier: aws.String("cust-demo-1"), Dimension: aws.String("requests"), Quantity: aws.Int32(1)},
	}})
	if err != nil || len(batch.Results) != 1 || batch.Results[0].Status != types.UsageRecordResultStatusSuccess {
		fail("BatchMeterUsage", err)
	}
	resolved, err := c.ResolveCustomer(ctx, &mm.ResolveCustomerInput{RegistrationToken: aws.String("demo-token-1")})
	if err != nil || aws.ToString(resolved.CustomerIdentifier) != "cust-demo-1" {
		fail("ResolveCustomer", err)
	}
	fmt.Println(aws.ToString(out.MeteringRecordId))
}
