// The AWS SDK for Go v1 (Debian's golang-github-aws-aws-sdk-go-dev, GOPATH mode) against
// `meterd emulator` at $METERD_EMULATOR_URL: the four operations and a typed exception.
package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/credentials"
	"github.com/aws/aws-sdk-go/aws/session"
	mm "github.com/aws/aws-sdk-go/service/marketplacemetering"
)

func main() {
	sess := session.Must(session.NewSession(&aws.Config{
		Region:      aws.String("us-east-1"),
		Endpoint:    aws.String(os.Getenv("METERD_EMULATOR_URL")),
		Credentials: credentials.NewStaticCredentials("AKIDGOV1", "secret", ""),
		MaxRetries:  aws.Int(0),
	}))
	c := mm.New(sess)
	hour := time.Now().UTC().Truncate(time.Hour).Add(-time.Hour)
	fail := func(what string, err error) {
		fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
		os.Exit(1)
	}
	if _, err := c.RegisterUsage(&mm.RegisterUsageInput{ProductCode: aws.String("prod-demo1234"), PublicKeyVersion: aws.Int64(1)}); err != nil {
		fail("RegisterUsage", err)
	}
	meter := &mm.MeterUsageInput{ProductCode: aws.String("prod-demo1234"), Timestamp: &hour, UsageDimension: aws.String("requests"), UsageQuantity: aws.Int64(5)}
	out, err := c.MeterUsage(meter)
	if err != nil {
		fail("MeterUsage", err)
	}
	meter.UsageQuantity = aws.Int64(6)
	_, err = c.MeterUsage(meter)
	var dup *mm.DuplicateRequestException
	if !errors.As(err, &dup) {
		fail("MeterUsage (duplicate) not a *DuplicateRequestException", err)
	}
	batch, err := c.BatchMeterUsage(&mm.BatchMeterUsageInput{ProductCode: aws.String("prod-demo1234"), UsageRecords: []*mm.UsageRecord{
		{Timestamp: &hour, CustomerIdentifier: aws.String("cust-demo-1"), Dimension: aws.String("requests"), Quantity: aws.Int64(1)},
	}})
	if err != nil || len(batch.Results) != 1 || aws.StringValue(batch.Results[0].Status) != "Success" {
		fail("BatchMeterUsage", err)
	}
	resolved, err := c.ResolveCustomer(&mm.ResolveCustomerInput{RegistrationToken: aws.String("demo-token-1")})
	if err != nil || aws.StringValue(resolved.CustomerIdentifier) != "cust-demo-1" {
		fail("ResolveCustomer", err)
	}
	fmt.Println(aws.StringValue(out.MeteringRecordId))
}
